//! Test tooling for NovaCron clusters.
//!
//! - [`linearizability`]: checks a recorded history of key-value reads and writes against a
//!   sequential register per key (Wing & Gong's search with Lowe's memoization, per key thanks to
//!   P-compositionality). The chaos tests of the cluster issue record their client histories and
//!   hand them to it.
//!
//! - [`proxy`]: a TCP proxy in front of each host that cuts, delays or breaks host-to-host
//!   traffic per directed link (partitions, one-way partitions, delay, loss).
//!
//! - [`seeded`]: the deterministic generator seeded tests across the workspace share.
//!
//! Invariant: test-only; the `novacron` binary never depends on this crate.

pub mod linearizability;
pub mod proxy;
pub mod seeded;
