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
pub mod lookup;
mod ports;

pub use compile::{
    Change, CompiledPolicy, Compiler, DatapathState, Direction, LocalEndpoint, PolicyId,
    PolicyMatch, RuleId, RuleOrigin,
};
pub use frontends::{Frontend, FrontendId, FrontendInfo, FrontendKind};
pub use identity::IdentityInfo;
pub use ports::port_prefixes;
