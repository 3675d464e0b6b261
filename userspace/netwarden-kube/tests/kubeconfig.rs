//! `--kubeconfig`: the agent reaches the API server the file names, or says which file failed.

use std::path::Path;

use netwarden_kube::{KubeError, client};

/// A kubeconfig whose current context points at `server`; nothing listens there, and nothing
/// is sent: building a client does not connect.
const KUBECONFIG: &str = "\
apiVersion: v1
kind: Config
clusters:
- name: test
  cluster: {server: 'https://127.0.0.1:6443', insecure-skip-tls-verify: true}
users:
- name: agent
  user: {token: not-a-real-token}
contexts:
- name: test
  context: {cluster: test, user: agent, namespace: netwarden-system}
current-context: test
";

#[tokio::test]
async fn a_kubeconfig_file_gives_a_client_for_its_current_context() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().join("kubeconfig");
    std::fs::write(&path, KUBECONFIG).expect("write the kubeconfig");
    let client = client(Some(&path))
        .await
        .unwrap_or_else(|error| panic!("a client from {}: {error}", path.display()));
    assert_eq!(client.default_namespace(), "netwarden-system");
}

#[tokio::test]
async fn a_missing_kubeconfig_is_an_error_naming_the_file() {
    let path = Path::new("/nonexistent/netwarden/kubeconfig");
    let Err(error) = client(Some(path)).await else {
        panic!("a client from a file that does not exist");
    };
    assert!(matches!(error, KubeError::Kubeconfig { .. }), "{error:?}");
    assert!(
        error
            .to_string()
            .contains("/nonexistent/netwarden/kubeconfig"),
        "{error}"
    );
}
