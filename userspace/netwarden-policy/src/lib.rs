//! netwarden's policy compiler: pure, no kernel, no I/O.
//!
//! [`Compiler`] turns a [`netwarden_model::Cluster`], kept up to date one [`Change`] at a time,
//! into [`DatapathState`]: the content of the eBPF maps (see `ebpf/netwarden-ebpf/src/verdict.rs`
//! for how the programs read them, and `docs/design.md` for why they are shaped this way).
//! [`map_keys`] builds the keys the agent writes it under, and [`lookup`] takes a packet through
//! the programs' checks on those maps, to the verdict and counter reason the kernel gives, so the
//! compiler is tested without a kernel; [`classify`] puts whole frames through the programs'
//! parser, conntrack and fragment tables on top of it. [`evaluate`] is the reference: the NetworkPolicy spec
//! applied directly to one flow, which the compiler is tested against and `netwarden explain`
//! prints.

mod cidr;
pub mod classify;
mod compile;
pub mod evaluate;
mod frontends;
mod identity;
mod ids;
pub mod lookup;
pub mod map_keys;
mod pods;
mod ports;
mod rules;
mod selectors;
mod state;
#[cfg(feature = "test-support")]
pub mod test_support;

pub use compile::{Change, Compiler};
pub use frontends::{Frontend, FrontendId, FrontendInfo, FrontendKind};
pub use identity::IdentityInfo;
pub use ports::port_prefixes;
pub use state::{
    CompiledPolicy, DatapathState, Direction, LocalEndpoint, PolicyId, PolicyMatch, RuleId,
    RuleOrigin, RulePolicy,
};
