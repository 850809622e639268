//! etcd-shim-injector: the mutating admission webhook that adds the etcd-shim sidecar to
//! pods created in namespaces labelled `etcd-shim.io/inject=enabled`.
//!
//! [`mutate::mutate`] decides and builds the JSON Patch without any I/O; [`review`] turns
//! AdmissionReview bodies into answers around it; [`server`] is the HTTPS transport with a
//! hot-reloaded serving certificate; [`cli`] holds the flags and the process wiring.
//!
//! Namespace opt-in is enforced by the webhook configuration's `namespaceSelector`: an
//! AdmissionRequest does not carry namespace labels, and looking them up would add an API
//! call, RBAC and a failure mode to every pod creation. The pure function still checks
//! the label whenever its caller knows the labels (`Some(labels)`); the service passes
//! `None`.

pub mod cli;
pub mod config;
pub mod metrics;
pub mod mutate;
pub mod review;
pub mod server;

pub use cli::{Args, run};
pub use config::{InjectConfig, SidecarMode};
pub use mutate::{Decision, SkipReason, mutate};
