//! The NovaCron node: the service layer ([`service`]), the REST API on top of it ([`api`]),
//! authentication ([`auth`]), metrics ([`metrics`]) and start-up ([`node`]).
//!
//! Invariants: handlers hold no business logic; the service layer never speaks QMP (it uses the
//! `Hypervisor` trait) and never writes state except through Raft commands.

pub mod api;
pub mod auth;
pub mod cluster;
pub mod limiter;
pub mod metrics;
pub mod node;
pub mod readiness;
pub mod service;
pub mod watchdog;
