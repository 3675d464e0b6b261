//! Label selectors with the API server's semantics.

use std::collections::BTreeMap;

/// Labels of a pod or namespace.
pub type Labels = BTreeMap<String, String>;

/// A validated `metav1.LabelSelector`: every requirement must hold.
///
/// The empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LabelSelector {
    /// `matchLabels` and `matchExpressions` merged into one list of requirements.
    pub requirements: Vec<Requirement>,
}

/// One requirement of a selector.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Requirement {
    /// The label is present and its value is one of these (`matchLabels` is `In` with one value).
    In(String, Vec<String>),
    /// The label is absent, or present with a value not among these.
    NotIn(String, Vec<String>),
    /// The label is present.
    Exists(String),
    /// The label is absent.
    DoesNotExist(String),
}

impl LabelSelector {
    /// The selector that matches everything.
    #[must_use]
    pub fn everything() -> Self {
        Self::default()
    }

    /// Whether `labels` satisfy every requirement.
    #[must_use]
    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements
            .iter()
            .all(|requirement| requirement.matches(labels))
    }

    /// Whether this is the empty selector.
    #[must_use]
    pub fn is_everything(&self) -> bool {
        self.requirements.is_empty()
    }
}

impl Requirement {
    /// Whether `labels` satisfy this requirement.
    #[must_use]
    pub fn matches(&self, labels: &Labels) -> bool {
        match self {
            Self::In(key, values) => labels.get(key).is_some_and(|value| values.contains(value)),
            Self::NotIn(key, values) => labels.get(key).is_none_or(|value| !values.contains(value)),
            Self::Exists(key) => labels.contains_key(key),
            Self::DoesNotExist(key) => !labels.contains_key(key),
        }
    }
}

impl std::fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.requirements.is_empty() {
            return f.write_str("{}");
        }
        let mut first = true;
        for requirement in &self.requirements {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            match requirement {
                Requirement::In(key, values) if values.len() == 1 => {
                    write!(f, "{key}={}", values[0])?;
                }
                Requirement::In(key, values) => write!(f, "{key} in ({})", values.join(","))?,
                Requirement::NotIn(key, values) => write!(f, "{key} notin ({})", values.join(","))?,
                Requirement::Exists(key) => write!(f, "{key}")?,
                Requirement::DoesNotExist(key) => write!(f, "!{key}")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{LabelSelector, Labels, Requirement};

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn not_in_matches_absent_labels_as_the_api_server_does() {
        let selector = LabelSelector {
            requirements: vec![Requirement::NotIn("tier".into(), vec!["db".into()])],
        };
        assert!(selector.matches(&labels(&[])));
        assert!(selector.matches(&labels(&[("tier", "web")])));
        assert!(!selector.matches(&labels(&[("tier", "db")])));
    }

    #[test]
    fn empty_selector_matches_everything_and_requirements_are_anded() {
        assert!(LabelSelector::everything().matches(&labels(&[("a", "b")])));
        let selector = LabelSelector {
            requirements: vec![
                Requirement::Exists("app".into()),
                Requirement::DoesNotExist("canary".into()),
                Requirement::In("env".into(), vec!["prod".into(), "stage".into()]),
            ],
        };
        assert!(selector.matches(&labels(&[("app", "x"), ("env", "stage")])));
        assert!(!selector.matches(&labels(&[("app", "x"), ("env", "stage"), ("canary", "1")])));
        assert!(!selector.matches(&labels(&[("env", "prod")])));
    }
}
