//! Writing each AuthorizationPolicy's status subresource, by one agent elected through a Lease.
