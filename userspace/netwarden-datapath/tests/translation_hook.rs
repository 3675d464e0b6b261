//! The hook after translation loads into the real kernel and attaches to a network
//! namespace's netfilter, and a second agent takes it over without a gap; every program, the
//! hook and the classifiers, loads with the verifier's budget to spare.

#[expect(
    dead_code,
    reason = "the test support serves several test binaries; this one needs only its bpffs guard"
)]
mod common;
#[path = "common/netns.rs"]
mod netns;

use std::path::Path;

use netwarden_datapath::{Capacity, Datapath, TranslationHook};

use crate::{common::PrivateBpffs, netns::in_new_netns};

#[test]
fn the_hook_attaches_to_postrouting_and_local_in_and_a_new_agent_replaces_it() {
    let Some(bpffs) = PrivateBpffs::new() else {
        return;
    };
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        eprintln!("skipped: this kernel publishes no BTF");
        return;
    }
    let root = bpffs.path().to_owned();
    in_new_netns(move || {
        let (mut first, _) = Datapath::open(&root, &Capacity::default()).expect("datapath");
        first
            .attach_translation_hook()
            .unwrap_or_else(|error| panic!("the hook attaches: {error}"));
        assert_eq!(first.translation_hook(), &TranslationHook::Attached);
        let links = root.join("netwarden/v1/links");
        let pinned = |dir: &Path| {
            let mut names: Vec<String> = std::fs::read_dir(dir)
                .expect("links dir")
                .flatten()
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with("netfilter-"))
                .collect();
            names.sort();
            names
        };
        assert_eq!(
            pinned(&links),
            [
                "netfilter-ipv4-local-in",
                "netfilter-ipv4-post-routing",
                "netfilter-ipv6-local-in",
                "netfilter-ipv6-post-routing"
            ]
        );
        drop(first);
        // A restarted agent attaches its own program and replaces the pins.
        let (mut second, _) = Datapath::open(&root, &Capacity::default()).expect("datapath");
        second.attach_translation_hook().expect("re-attaches");
        assert_eq!(pinned(&links).len(), 4);
    });
}

/// The share of the verifier's budget (1,000,000 instructions processed per program) a
/// program may use on this kernel. Another kernel's verifier prunes differently; the headroom
/// is what keeps it from refusing a program that loads here, and this test says when it runs
/// out.
const VERIFIER_BUDGET_USED_AT_MOST: u32 = 700_000;

#[test]
fn every_program_leaves_the_verifier_headroom() {
    let Some(bpffs) = PrivateBpffs::new() else {
        return;
    };
    let (datapath, _) = Datapath::open(bpffs.path(), &Capacity::default()).expect("datapath");
    let counts = datapath
        .verified_instructions()
        .unwrap_or_else(|error| panic!("the programs' verifier figures: {error}"));
    let names: Vec<&str> = counts.iter().map(|(name, _)| *name).collect();
    assert_eq!(
        names,
        ["from_container", "to_container", "after_translation"]
    );
    for (name, count) in counts {
        eprintln!("{name}: {count} instructions verified");
        assert!(count > 0, "{name}: this kernel reported no verifier figure");
        assert!(
            count <= VERIFIER_BUDGET_USED_AT_MOST,
            "{name}: the verifier processed {count} instructions, over \
             {VERIFIER_BUDGET_USED_AT_MOST} of the 1,000,000 a program may take"
        );
    }
}
