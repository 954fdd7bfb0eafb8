//! Role bindings: who (principals, groups) holds which built-in role, optionally only in
//! some environments (`prod`, `staging-*`) or, for agents, only for some targets
//! (`prod/web-1`, `prod/web-*`). The policy file is JSON:
//!
//! ```json
//! {"bindings": [
//!   {"role": "deployer", "groups": ["team-checkout"], "environments": ["staging-*"]},
//!   {"role": "agent", "principals": ["spiffe://example.org/agent/web-1"], "targets": ["prod/web-1"]},
//!   {"role": "admin", "principals": ["alice"]}
//! ]}
//! ```
//!
//! A binding without `environments` holds everywhere, except for the `agent` role, which
//! acts only for the targets it names (none named: none).

use serde::Deserialize;

use super::table::{role, Permission, Permissions};
use super::Identity;

/// One binding as written in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Binding {
    /// A built-in role.
    pub role: String,
    /// Principals holding it.
    #[serde(default)]
    pub principals: Vec<String>,
    /// Groups holding it.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Environment patterns it is limited to (empty: all).
    #[serde(default)]
    pub environments: Vec<String>,
    /// Target patterns (`environment/target`) an agent binding acts for.
    #[serde(default)]
    pub targets: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    bindings: Vec<Binding>,
}

/// The parsed policy.
#[derive(Debug, Clone)]
pub struct Policy {
    bindings: Vec<(Binding, Permissions)>,
}

impl Policy {
    /// Parses a policy file; an unknown role or a bad pattern is an error.
    pub fn parse(bytes: &[u8]) -> anyhow::Result<Self> {
        let file: File = serde_json::from_slice(bytes)?;
        let mut bindings = Vec::new();
        for (i, b) in file.bindings.into_iter().enumerate() {
            let Some(perms) = role(&b.role) else {
                anyhow::bail!("binding {i}: unknown role {:?}", b.role);
            };
            anyhow::ensure!(
                !b.principals.is_empty() || !b.groups.is_empty(),
                "binding {i}: names no principal and no group"
            );
            for t in &b.targets {
                anyhow::ensure!(
                    t.split_once('/').is_some(),
                    "binding {i}: target pattern {t:?} is not environment/target"
                );
            }
            bindings.push((b, perms));
        }
        Ok(Self { bindings })
    }

    /// The grants of `identity`.
    pub fn grants(&self, identity: &Identity) -> Grants {
        let mut grants = Vec::new();
        for (b, perms) in &self.bindings {
            let holds = b.principals.iter().any(|p| p == &identity.principal)
                || b.groups.iter().any(|g| identity.groups.contains(g));
            if !holds {
                continue;
            }
            let scope = if b.role == "agent" {
                GrantScope::Targets(b.targets.clone())
            } else if b.environments.is_empty() {
                GrantScope::All
            } else {
                GrantScope::Environments(b.environments.clone())
            };
            grants.push(Grant {
                permissions: *perms,
                scope,
            });
        }
        Grants { grants }
    }
}

/// Where a grant holds.
#[derive(Debug, Clone)]
enum GrantScope {
    All,
    Environments(Vec<String>),
    Targets(Vec<String>),
}

#[derive(Debug, Clone)]
struct Grant {
    permissions: Permissions,
    scope: GrantScope,
}

/// What one identity may do.
#[derive(Debug, Clone)]
pub struct Grants {
    grants: Vec<Grant>,
}

impl Grants {
    /// Everything everywhere (authentication off).
    pub fn unrestricted() -> Self {
        Self {
            grants: vec![Grant {
                permissions: Permissions::all(),
                scope: GrantScope::All,
            }],
        }
    }

    /// Whether `p` is granted anywhere.
    pub fn anywhere(&self, p: Permission) -> bool {
        self.grants.iter().any(|g| g.permissions.contains(p))
    }

    /// Whether `p` is granted in `environment`.
    pub fn in_environment(&self, p: Permission, environment: &str) -> bool {
        self.grants.iter().any(|g| {
            g.permissions.contains(p)
                && match &g.scope {
                    GrantScope::All => true,
                    GrantScope::Environments(pats) => pats.iter().any(|x| matches(x, environment)),
                    GrantScope::Targets(_) => false,
                }
        })
    }

    /// Whether `p` is granted for target `target` of `environment`.
    pub fn for_target(&self, p: Permission, environment: &str, target: &str) -> bool {
        self.grants.iter().any(|g| {
            g.permissions.contains(p)
                && match &g.scope {
                    GrantScope::All => true,
                    GrantScope::Environments(pats) => pats.iter().any(|x| matches(x, environment)),
                    GrantScope::Targets(pats) => pats.iter().any(|x| {
                        x.split_once('/')
                            .is_some_and(|(e, t)| matches(e, environment) && matches(t, target))
                    }),
                }
        })
    }
}

/// Glob match with `*` (any run of characters) as the only wildcard.
pub fn matches(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if text.len() < first.len() + last.len() || !text.starts_with(first) || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(i) => rest = &rest[i + middle.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(p: &str, groups: &[&str]) -> Identity {
        Identity {
            principal: p.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            method: "test",
        }
    }

    #[test]
    fn globs() {
        assert!(matches("staging-*", "staging-eu"));
        assert!(!matches("staging-*", "prod"));
        assert!(matches("*", "anything"));
        assert!(matches("a*b*c", "aXbYc"));
        assert!(!matches("a*b*c", "aXc"));
        assert!(matches("prod", "prod"));
        assert!(!matches("prod", "prod2"));
        assert!(!matches("ab*ba", "aba"));
    }

    #[test]
    fn scoped_bindings_hold_only_where_they_say() {
        let policy = Policy::parse(
            br#"{"bindings":[
              {"role":"deployer","groups":["team"],"environments":["staging-*"]},
              {"role":"agent","principals":["agent-1"],"targets":["prod/web-1"]},
              {"role":"approver","principals":["ann"],"environments":["prod"]}
            ]}"#,
        )
        .expect("policy");
        let dev = policy.grants(&id("bob", &["team"]));
        assert!(dev.in_environment(Permission::DeploymentsCreate, "staging-eu"));
        assert!(!dev.in_environment(Permission::DeploymentsCreate, "prod"));
        assert!(dev.anywhere(Permission::DeploymentsRead));
        let agent = policy.grants(&id("agent-1", &[]));
        assert!(agent.for_target(Permission::TargetsAct, "prod", "web-1"));
        assert!(!agent.for_target(Permission::TargetsAct, "prod", "web-2"));
        assert!(!agent.in_environment(Permission::TargetsAct, "prod"));
        let ann = policy.grants(&id("ann", &[]));
        assert!(ann.in_environment(Permission::ReleasesApprove, "prod"));
        assert!(!ann.in_environment(Permission::ReleasesApprove, "staging"));
        assert!(!policy
            .grants(&id("eve", &[]))
            .anywhere(Permission::Reflection));
        assert!(Policy::parse(br#"{"bindings":[{"role":"root","principals":["x"]}]}"#).is_err());
    }
}
