//! netwarden's policy compiler.
//!
//! [`Compiler::compile`] turns a [`netwarden_model::Cluster`] into [`DatapathState`]: the exact
//! content of the eBPF maps (see `ebpf/netwarden-ebpf/src/verdict.rs` for how the datapath reads
//! them, and `docs/design.md` for why they are shaped this way). [`lookup`] reads a
//! `DatapathState` exactly the way the eBPF program reads the maps, so the compiler can be tested
//! without a kernel.

mod cidr;
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

pub use compile::{Change, Compiler};
pub use frontends::{Frontend, FrontendId, FrontendInfo, FrontendKind};
pub use identity::IdentityInfo;
pub use ports::port_prefixes;
pub use state::{
    CompiledPolicy, DatapathState, Direction, LocalEndpoint, PolicyId, PolicyMatch, RuleId,
    RuleOrigin,
};
