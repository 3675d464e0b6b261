//! `{{ip NS/POD}}`, `{{ip6 NS/POD}}`, `{{cidr NS/POD N}}` (and `{{cidr6 NS/POD N}}`) in policies.
//!
//! Substitution works on the string scalars of the parsed object, never on the YAML text, so a
//! substituted address can never change the document's structure.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;

use crate::scenario::IpFamily;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlaceholderError {
    #[error("unterminated placeholder in {0:?}")]
    Unterminated(String),
    #[error("{{{{{0}}}}} is not a placeholder (expected ip, ip6, cidr or cidr6 with a target)")]
    Malformed(String),
    #[error("{0}: prefix length {1} is too long for the address")]
    Prefix(String, u8),
    #[error("{0}: no pod or external host by that name exists now")]
    Unknown(String),
    #[error("{0}: the target has no {1} address")]
    NoAddress(String, IpFamily),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placeholder {
    /// The target's address in the model's primary family.
    Ip(String),
    Ip6(String),
    Cidr(String, u8),
    Cidr6(String, u8),
}

impl Placeholder {
    #[must_use]
    pub fn target(&self) -> &str {
        match self {
            Self::Ip(target)
            | Self::Ip6(target)
            | Self::Cidr(target, _)
            | Self::Cidr6(target, _) => target,
        }
    }

    #[must_use]
    pub fn family(&self, primary: IpFamily) -> IpFamily {
        match self {
            Self::Ip(_) | Self::Cidr(..) => primary,
            Self::Ip6(_) | Self::Cidr6(..) => IpFamily::IPv6,
        }
    }

    /// The text that replaces the placeholder, given the target's addresses.
    pub fn render(
        &self,
        primary: IpFamily,
        v4: Option<Ipv4Addr>,
        v6: Option<Ipv6Addr>,
    ) -> Result<String, PlaceholderError> {
        let family = self.family(primary);
        let address: IpAddr = match family {
            IpFamily::IPv4 => v4.map(IpAddr::V4),
            IpFamily::IPv6 => v6.map(IpAddr::V6),
        }
        .ok_or_else(|| PlaceholderError::NoAddress(self.to_string(), family))?;
        match self {
            Self::Ip(_) | Self::Ip6(_) => Ok(address.to_string()),
            Self::Cidr(_, prefix) | Self::Cidr6(_, prefix) => {
                let net = IpNet::new(address, *prefix)
                    .map_err(|_| PlaceholderError::Prefix(self.to_string(), *prefix))?;
                Ok(net.trunc().to_string())
            }
        }
    }
}

impl fmt::Display for Placeholder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ip(target) => write!(f, "{{{{ip {target}}}}}"),
            Self::Ip6(target) => write!(f, "{{{{ip6 {target}}}}}"),
            Self::Cidr(target, prefix) => write!(f, "{{{{cidr {target} {prefix}}}}}"),
            Self::Cidr6(target, prefix) => write!(f, "{{{{cidr6 {target} {prefix}}}}}"),
        }
    }
}

fn parse_one(inner: &str) -> Result<Placeholder, PlaceholderError> {
    let malformed = || PlaceholderError::Malformed(inner.to_owned());
    let words: Vec<&str> = inner.split_whitespace().collect();
    let prefix = |text: &str| text.parse::<u8>().map_err(|_| malformed());
    match words.as_slice() {
        ["ip", target] => Ok(Placeholder::Ip((*target).to_owned())),
        ["ip6", target] => Ok(Placeholder::Ip6((*target).to_owned())),
        ["cidr", target, length] => Ok(Placeholder::Cidr((*target).to_owned(), prefix(length)?)),
        ["cidr6", target, length] => Ok(Placeholder::Cidr6((*target).to_owned(), prefix(length)?)),
        _ => Err(malformed()),
    }
}

/// Replaces every placeholder of `text` with what `resolve` gives for it.
pub fn substitute(
    text: &str,
    mut resolve: impl FnMut(&Placeholder) -> Result<String, PlaceholderError>,
) -> Result<String, PlaceholderError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| PlaceholderError::Unterminated(text.to_owned()))?;
        out.push_str(&resolve(&parse_one(&after[..end])?)?);
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The placeholders of `text`, in order.
pub fn parse_all(text: &str) -> Result<Vec<Placeholder>, PlaceholderError> {
    let mut found = Vec::new();
    substitute(text, |placeholder| {
        found.push(placeholder.clone());
        Ok(String::new())
    })?;
    Ok(found)
}

/// Calls `visit` with every string scalar of `value`.
pub fn visit_strings(value: &serde_yaml::Value, visit: &mut impl FnMut(&str)) {
    match value {
        serde_yaml::Value::String(text) => visit(text),
        serde_yaml::Value::Sequence(items) => {
            for item in items {
                visit_strings(item, visit);
            }
        }
        serde_yaml::Value::Mapping(map) => map.values().for_each(|item| visit_strings(item, visit)),
        serde_yaml::Value::Tagged(tagged) => visit_strings(&tagged.value, visit),
        serde_yaml::Value::Null | serde_yaml::Value::Bool(_) | serde_yaml::Value::Number(_) => {}
    }
}

/// `value` with every string scalar substituted.
pub fn substitute_value(
    value: &serde_yaml::Value,
    resolve: &mut impl FnMut(&Placeholder) -> Result<String, PlaceholderError>,
) -> Result<serde_yaml::Value, PlaceholderError> {
    Ok(match value {
        serde_yaml::Value::String(text) => {
            serde_yaml::Value::String(substitute(text, &mut *resolve)?)
        }
        serde_yaml::Value::Sequence(items) => serde_yaml::Value::Sequence(
            items
                .iter()
                .map(|item| substitute_value(item, resolve))
                .collect::<Result<_, _>>()?,
        ),
        serde_yaml::Value::Mapping(map) => {
            let mut out = serde_yaml::Mapping::with_capacity(map.len());
            for (key, item) in map {
                out.insert(key.clone(), substitute_value(item, resolve)?);
            }
            serde_yaml::Value::Mapping(out)
        }
        other => other.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const V4: Option<Ipv4Addr> = Some(Ipv4Addr::new(10, 244, 0, 13));
    const V6: Option<Ipv6Addr> = Some(Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 0xd));

    fn render_all(text: &str, primary: IpFamily) -> Result<String, PlaceholderError> {
        substitute(text, |placeholder| match placeholder.target() {
            "x/a" => placeholder.render(primary, V4, V6),
            "ext1" => placeholder.render(primary, Some(Ipv4Addr::new(198, 18, 0, 12)), None),
            other => Err(PlaceholderError::Unknown(other.to_owned())),
        })
    }

    #[test]
    fn substitutes_addresses_and_canonical_cidrs() {
        assert_eq!(
            render_all("{{ip x/a}}/32", IpFamily::IPv4).unwrap(),
            "10.244.0.13/32"
        );
        assert_eq!(
            render_all("{{ cidr x/a 16 }}", IpFamily::IPv4).unwrap(),
            "10.244.0.0/16"
        );
        assert_eq!(
            render_all("{{cidr x/a 24}} and {{ip ext1}}", IpFamily::IPv4).unwrap(),
            "10.244.0.0/24 and 198.18.0.12"
        );
        assert_eq!(
            render_all("{{ip6 x/a}}", IpFamily::IPv4).unwrap(),
            "fd00:10:244::d"
        );
        assert_eq!(
            render_all("{{ip x/a}}", IpFamily::IPv6).unwrap(),
            "fd00:10:244::d"
        );
        assert_eq!(
            render_all("{{cidr x/a 64}}", IpFamily::IPv6).unwrap(),
            "fd00:10:244::/64"
        );
        assert_eq!(
            render_all("{{cidr6 x/a 128}}", IpFamily::IPv4).unwrap(),
            "fd00:10:244::d/128"
        );
        assert_eq!(
            render_all("no placeholder", IpFamily::IPv4).unwrap(),
            "no placeholder"
        );
    }

    #[test]
    fn reports_bad_placeholders() {
        assert!(matches!(
            render_all("{{ip x/a", IpFamily::IPv4),
            Err(PlaceholderError::Unterminated(_))
        ));
        assert!(matches!(
            render_all("{{host x/a}}", IpFamily::IPv4),
            Err(PlaceholderError::Malformed(_))
        ));
        assert!(matches!(
            render_all("{{cidr x/a}}", IpFamily::IPv4),
            Err(PlaceholderError::Malformed(_))
        ));
        assert!(matches!(
            render_all("{{cidr x/a 33}}", IpFamily::IPv4),
            Err(PlaceholderError::Prefix(..))
        ));
        assert!(matches!(
            render_all("{{ip6 ext1}}", IpFamily::IPv4),
            Err(PlaceholderError::NoAddress(..))
        ));
        assert_eq!(
            render_all("{{ip y/q}}", IpFamily::IPv4),
            Err(PlaceholderError::Unknown("y/q".to_owned()))
        );
    }

    #[test]
    fn substitutes_inside_objects_only_in_strings() {
        let value: serde_yaml::Value =
            serde_yaml::from_str("spec: { ingress: [ { from: [ { ipBlock: { cidr: '{{cidr x/a 16}}', except: ['{{ip x/a}}/32'] } } ] } ], port: 80 }")
                .unwrap();
        let out = substitute_value(&value, &mut |p| p.render(IpFamily::IPv4, V4, V6)).unwrap();
        let block = &out["spec"]["ingress"][0]["from"][0]["ipBlock"];
        assert_eq!(block["cidr"], "10.244.0.0/16");
        assert_eq!(block["except"][0], "10.244.0.13/32");
        assert_eq!(out["spec"]["port"], 80);
        let mut seen = Vec::new();
        visit_strings(&value, &mut |text| seen.push(text.to_owned()));
        assert_eq!(seen, ["{{cidr x/a 16}}", "{{ip x/a}}/32"]);
    }
}
