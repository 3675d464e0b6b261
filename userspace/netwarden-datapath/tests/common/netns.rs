//! For the tests that attach programs: a network namespace of their own.
/// Runs `test` on a thread of its own in a new network namespace, so what it attaches never
/// touches the namespace the tests run in.
pub fn in_new_netns(test: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("a network namespace of the test's own");
        test();
    })
    .join()
    .expect("the test thread");
}
