//! An in-process fake Kubernetes API server: list and watch, for the kubernetes source's tests.
