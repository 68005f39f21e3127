//! Empty library target: lets mesh-agent name this crate as a build-dependency so cargo rebuilds on change.
#![no_std]
