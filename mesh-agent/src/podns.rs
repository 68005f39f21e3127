//! Finding a pod's network namespace on a node from its UID: kubepods cgroup, then a process, then its netns.
