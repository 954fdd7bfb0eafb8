//! The one authorization table: every RPC that either service serves, mapped to the
//! permission it needs and to how that permission is scoped. A method missing here is
//! refused by the [`layer`](super::layer) before any handler runs.
//!
//! Scopes: [`Scope::Global`] methods touch no single environment (features, artifacts,
//! audit, reads); [`Scope::Environment`] methods name an environment (directly, through a
//! release or a deployment) and their handler checks the binding's environments;
//! [`Scope::Target`] methods are an agent's and their handler checks the binding's targets.

/// A permission, granted by roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Permission {
    /// Health checks: needs no credentials (probes cannot present any).
    Health,
    /// Server reflection (`grpcurl list`, `describe`).
    Reflection,
    /// Read environments and their calendars.
    EnvironmentsRead,
    /// Create an environment.
    EnvironmentsCreate,
    /// Change an environment, its freeze windows and its `protected` flag.
    EnvironmentsUpdate,
    /// Override a freeze: approve an emergency change, remove an active freeze window.
    FreezeOverride,
    /// Read targets.
    TargetsRead,
    /// Register a target.
    TargetsRegister,
    /// Act as a target's agent: heartbeat, watch orders, report placements.
    TargetsAct,
    /// Read artifacts.
    ArtifactsRead,
    /// Register an artifact version.
    ArtifactsRegister,
    /// Read deployments.
    DeploymentsRead,
    /// Create a deployment.
    DeploymentsCreate,
    /// Cancel, continue or roll back a deployment.
    DeploymentsManage,
    /// Follow the placement event stream.
    PlacementsWatch,
    /// Read audit trails.
    AuditRead,
    /// Read features and export them.
    FeaturesRead,
    /// Create, change and import features.
    FeaturesWrite,
    /// Read releases, withdrawals, checks and the consumer's status.
    ReleasesRead,
    /// Create a release.
    ReleasesCreate,
    /// Submit, roll out, pause, resume, roll back or cancel a release.
    ReleasesManage,
    /// Approve a release.
    ReleasesApprove,
    /// Read release policies.
    PoliciesRead,
    /// Change a release policy.
    PoliciesWrite,
    /// Evaluate features (release.v1 Evaluate and the flagd protocols).
    Evaluate,
}

impl Permission {
    /// Every permission.
    pub const ALL: [Permission; 25] = [
        Self::Health,
        Self::Reflection,
        Self::EnvironmentsRead,
        Self::EnvironmentsCreate,
        Self::EnvironmentsUpdate,
        Self::FreezeOverride,
        Self::TargetsRead,
        Self::TargetsRegister,
        Self::TargetsAct,
        Self::ArtifactsRead,
        Self::ArtifactsRegister,
        Self::DeploymentsRead,
        Self::DeploymentsCreate,
        Self::DeploymentsManage,
        Self::PlacementsWatch,
        Self::AuditRead,
        Self::FeaturesRead,
        Self::FeaturesWrite,
        Self::ReleasesRead,
        Self::ReleasesCreate,
        Self::ReleasesManage,
        Self::ReleasesApprove,
        Self::PoliciesRead,
        Self::PoliciesWrite,
        Self::Evaluate,
    ];

    /// The permission's name in errors and documentation.
    pub fn name(self) -> &'static str {
        match self {
            Self::Health => "health.check",
            Self::Reflection => "reflection.read",
            Self::EnvironmentsRead => "environments.read",
            Self::EnvironmentsCreate => "environments.create",
            Self::EnvironmentsUpdate => "environments.update",
            Self::FreezeOverride => "freeze.override",
            Self::TargetsRead => "targets.read",
            Self::TargetsRegister => "targets.register",
            Self::TargetsAct => "targets.act",
            Self::ArtifactsRead => "artifacts.read",
            Self::ArtifactsRegister => "artifacts.register",
            Self::DeploymentsRead => "deployments.read",
            Self::DeploymentsCreate => "deployments.create",
            Self::DeploymentsManage => "deployments.manage",
            Self::PlacementsWatch => "placements.watch",
            Self::AuditRead => "audit.read",
            Self::FeaturesRead => "features.read",
            Self::FeaturesWrite => "features.write",
            Self::ReleasesRead => "releases.read",
            Self::ReleasesCreate => "releases.create",
            Self::ReleasesManage => "releases.manage",
            Self::ReleasesApprove => "releases.approve",
            Self::PoliciesRead => "policies.read",
            Self::PoliciesWrite => "policies.write",
            Self::Evaluate => "features.evaluate",
        }
    }

    /// Bit of this permission in a [`Permissions`] set.
    pub(crate) fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

/// How a method's permission is scoped (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Not tied to one environment.
    Global,
    /// Checked against the environment(s) the request names.
    Environment,
    /// Checked against the target the request names.
    Target,
}

/// One row of the table.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    /// The gRPC path, `/package.Service/Method`.
    pub path: &'static str,
    /// The permission the method needs.
    pub permission: Permission,
    /// How it is scoped.
    pub scope: Scope,
}

const fn rule(path: &'static str, permission: Permission, scope: Scope) -> Rule {
    Rule {
        path,
        permission,
        scope,
    }
}

use Permission as P;
use Scope::{Environment as Env, Global, Target};

/// Every RPC of both services.
pub const TABLE: &[Rule] = &[
    // grpc.health.v1 and reflection
    rule("/grpc.health.v1.Health/Check", P::Health, Global),
    rule("/grpc.health.v1.Health/Watch", P::Health, Global),
    rule("/grpc.health.v1.Health/List", P::Health, Global),
    rule(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        P::Reflection,
        Global,
    ),
    rule(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        P::Reflection,
        Global,
    ),
    // deploy.v1
    rule(
        "/deploy.v1.DeployService/CreateEnvironment",
        P::EnvironmentsCreate,
        Env,
    ),
    rule(
        "/deploy.v1.DeployService/GetEnvironment",
        P::EnvironmentsRead,
        Global,
    ),
    rule(
        "/deploy.v1.DeployService/ListEnvironments",
        P::EnvironmentsRead,
        Global,
    ),
    rule(
        "/deploy.v1.DeployService/UpdateEnvironment",
        P::EnvironmentsUpdate,
        Env,
    ),
    rule(
        "/deploy.v1.DeployService/RegisterTarget",
        P::TargetsRegister,
        Target,
    ),
    rule(
        "/deploy.v1.DeployService/ListTargets",
        P::TargetsRead,
        Global,
    ),
    rule(
        "/deploy.v1.DeployService/HeartbeatTarget",
        P::TargetsAct,
        Target,
    ),
    rule(
        "/deploy.v1.DeployService/RegisterArtifact",
        P::ArtifactsRegister,
        Global,
    ),
    rule(
        "/deploy.v1.DeployService/GetArtifact",
        P::ArtifactsRead,
        Global,
    ),
    rule(
        "/deploy.v1.DeployService/ListArtifacts",
        P::ArtifactsRead,
        Global,
    ),
    rule(
        "/deploy.v1.DeployService/CreateDeployment",
        P::DeploymentsCreate,
        Env,
    ),
    rule(
        "/deploy.v1.DeployService/GetDeployment",
        P::DeploymentsRead,
        Global,
    ),
    rule(
        "/deploy.v1.DeployService/ListDeployments",
        P::DeploymentsRead,
        Global,
    ),
    rule(
        "/deploy.v1.DeployService/CancelDeployment",
        P::DeploymentsManage,
        Env,
    ),
    rule(
        "/deploy.v1.DeployService/ContinueDeployment",
        P::DeploymentsManage,
        Env,
    ),
    rule(
        "/deploy.v1.DeployService/RollbackDeployment",
        P::DeploymentsManage,
        Env,
    ),
    rule(
        "/deploy.v1.DeployService/ReportPlacement",
        P::TargetsAct,
        Target,
    ),
    rule(
        "/deploy.v1.DeployService/WatchPlacements",
        P::PlacementsWatch,
        Global,
    ),
    rule(
        "/deploy.v1.DeployService/ListAuditRecords",
        P::AuditRead,
        Global,
    ),
    rule(
        "/deploy.v1.DeployService/WatchOrders",
        P::TargetsAct,
        Target,
    ),
    rule(
        "/deploy.v1.DeployService/GrantEmergencyOverride",
        P::FreezeOverride,
        Env,
    ),
    // The handler checks the environment named, or leaves out those the caller may not
    // view.
    rule(
        "/deploy.v1.DeployService/ListInventory",
        P::DeploymentsRead,
        Env,
    ),
    // release.v1
    rule(
        "/release.v1.ReleaseService/CreateFeature",
        P::FeaturesWrite,
        Global,
    ),
    rule(
        "/release.v1.ReleaseService/GetFeature",
        P::FeaturesRead,
        Global,
    ),
    rule(
        "/release.v1.ReleaseService/ListFeatures",
        P::FeaturesRead,
        Global,
    ),
    rule(
        "/release.v1.ReleaseService/UpdateFeature",
        P::FeaturesWrite,
        Global,
    ),
    rule(
        "/release.v1.ReleaseService/ArchiveFeature",
        P::FeaturesWrite,
        Global,
    ),
    rule(
        "/release.v1.ReleaseService/UnarchiveFeature",
        P::FeaturesWrite,
        Global,
    ),
    rule(
        "/release.v1.ReleaseService/CreateRelease",
        P::ReleasesCreate,
        Env,
    ),
    rule(
        "/release.v1.ReleaseService/GetRelease",
        P::ReleasesRead,
        Global,
    ),
    rule(
        "/release.v1.ReleaseService/ListReleases",
        P::ReleasesRead,
        Global,
    ),
    rule(
        "/release.v1.ReleaseService/SetRollout",
        P::ReleasesManage,
        Env,
    ),
    rule(
        "/release.v1.ReleaseService/PauseRelease",
        P::ReleasesManage,
        Env,
    ),
    rule(
        "/release.v1.ReleaseService/ResumeRelease",
        P::ReleasesManage,
        Env,
    ),
    rule(
        "/release.v1.ReleaseService/RollbackRelease",
        P::ReleasesManage,
        Env,
    ),
    rule("/release.v1.ReleaseService/Evaluate", P::Evaluate, Env),
    rule("/release.v1.ReleaseService/EvaluateBatch", P::Evaluate, Env),
    rule(
        "/release.v1.ReleaseService/WatchVisibility",
        P::Evaluate,
        Env,
    ),
    rule(
        "/release.v1.ReleaseService/GetReleaseTimeline",
        P::ReleasesRead,
        Global,
    ),
    rule(
        "/release.v1.ReleaseService/GetFeatureUsage",
        P::FeaturesRead,
        Global,
    ),
    rule(
        "/release.v1.ReleaseService/ListStaleFeatures",
        P::FeaturesRead,
        Global,
    ),
    rule(
        "/release.v1.ReleaseService/ListVisibility",
        P::ReleasesRead,
        Global,
    ),
    rule(
        "/release.v1.ReleaseService/GetConsumerStatus",
        P::ReleasesRead,
        Global,
    ),
    rule(
        "/release.v1.ReleaseService/ListWithdrawals",
        P::ReleasesRead,
        Global,
    ),
    rule(
        "/release.v1.ReleaseService/ImportFlagd",
        P::FeaturesWrite,
        Global,
    ),
    rule(
        "/release.v1.ReleaseService/ExportFlagd",
        P::FeaturesRead,
        Global,
    ),
    rule(
        "/release.v1.ReleaseService/SubmitRelease",
        P::ReleasesManage,
        Env,
    ),
    rule(
        "/release.v1.ReleaseService/ApproveRelease",
        P::ReleasesApprove,
        Env,
    ),
    rule(
        "/release.v1.ReleaseService/CancelRelease",
        P::ReleasesManage,
        Env,
    ),
    rule(
        "/release.v1.ReleaseService/SetEmergencyOverride",
        P::FreezeOverride,
        Env,
    ),
    rule(
        "/release.v1.ReleaseService/CheckRelease",
        P::ReleasesRead,
        Global,
    ),
    rule(
        "/release.v1.ReleaseService/GetPolicy",
        P::PoliciesRead,
        Global,
    ),
    rule(
        "/release.v1.ReleaseService/SetPolicy",
        P::PoliciesWrite,
        Env,
    ),
    rule(
        "/release.v1.ReleaseService/ListAuditRecords",
        P::AuditRead,
        Global,
    ),
    // flagd evaluation v1 and v2: the environment is the one the call resolves to
    rule(
        "/flagd.evaluation.v1.Service/ResolveBoolean",
        P::Evaluate,
        Env,
    ),
    rule(
        "/flagd.evaluation.v1.Service/ResolveString",
        P::Evaluate,
        Env,
    ),
    rule(
        "/flagd.evaluation.v1.Service/ResolveFloat",
        P::Evaluate,
        Env,
    ),
    rule("/flagd.evaluation.v1.Service/ResolveInt", P::Evaluate, Env),
    rule(
        "/flagd.evaluation.v1.Service/ResolveObject",
        P::Evaluate,
        Env,
    ),
    rule("/flagd.evaluation.v1.Service/ResolveAll", P::Evaluate, Env),
    rule(
        "/flagd.evaluation.v1.Service/EventStream",
        P::Evaluate,
        Global,
    ),
    rule(
        "/flagd.evaluation.v2.Service/ResolveBoolean",
        P::Evaluate,
        Env,
    ),
    rule(
        "/flagd.evaluation.v2.Service/ResolveString",
        P::Evaluate,
        Env,
    ),
    rule(
        "/flagd.evaluation.v2.Service/ResolveFloat",
        P::Evaluate,
        Env,
    ),
    rule("/flagd.evaluation.v2.Service/ResolveInt", P::Evaluate, Env),
    rule(
        "/flagd.evaluation.v2.Service/ResolveObject",
        P::Evaluate,
        Env,
    ),
    rule("/flagd.evaluation.v2.Service/ResolveAll", P::Evaluate, Env),
    rule(
        "/flagd.evaluation.v2.Service/EventStream",
        P::Evaluate,
        Global,
    ),
    // flagd sync: an environment's flag definitions for in-process evaluation; the handler
    // checks the environment the selector names
    rule("/flagd.sync.v1.FlagSyncService/SyncFlags", P::Evaluate, Env),
    rule(
        "/flagd.sync.v1.FlagSyncService/FetchAllFlags",
        P::Evaluate,
        Env,
    ),
    rule(
        "/flagd.sync.v1.FlagSyncService/GetMetadata",
        P::Evaluate,
        Env,
    ),
];

/// The rule of a gRPC path, if the table has one.
pub fn lookup(path: &str) -> Option<&'static Rule> {
    TABLE.iter().find(|r| r.path == path)
}

/// A set of permissions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Permissions(u32);

impl Permissions {
    /// Every permission.
    pub fn all() -> Self {
        Self(Permission::ALL.iter().fold(0, |acc, p| acc | p.bit()))
    }

    /// The set of `list`.
    pub fn of(list: &[Permission]) -> Self {
        Self(list.iter().fold(0, |acc, p| acc | p.bit()))
    }

    /// Whether `p` is in the set.
    pub fn contains(self, p: Permission) -> bool {
        self.0 & p.bit() != 0
    }

    /// The union.
    pub fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }
}

/// The built-in roles and their permissions.
pub fn role(name: &str) -> Option<Permissions> {
    let viewer = [
        P::Reflection,
        P::EnvironmentsRead,
        P::TargetsRead,
        P::ArtifactsRead,
        P::DeploymentsRead,
        P::FeaturesRead,
        P::ReleasesRead,
        P::PoliciesRead,
    ];
    let with = |extra: &[Permission]| Permissions::of(&viewer).union(Permissions::of(extra));
    Some(match name {
        "viewer" => Permissions::of(&viewer),
        "deployer" => with(&[
            P::ArtifactsRegister,
            P::DeploymentsCreate,
            P::DeploymentsManage,
        ]),
        "agent" => Permissions::of(&[P::Reflection, P::TargetsRegister, P::TargetsAct]),
        "environment-admin" => with(&[
            P::EnvironmentsCreate,
            P::EnvironmentsUpdate,
            P::TargetsRegister,
        ]),
        "release-manager" => with(&[P::FeaturesWrite, P::ReleasesCreate, P::ReleasesManage]),
        "approver" => with(&[P::ReleasesApprove, P::FreezeOverride]),
        "policy-admin" => with(&[P::PoliciesWrite]),
        "evaluator" => Permissions::of(&[P::Reflection, P::Evaluate]),
        "auditor" => with(&[P::AuditRead]),
        // What release-svc needs of deploy-svc, and nothing more.
        "release-service" => Permissions::of(&[P::PlacementsWatch, P::EnvironmentsRead]),
        "admin" => Permissions::all(),
        _ => return None,
    })
}

/// The names of the built-in roles.
pub const ROLES: [&str; 11] = [
    "viewer",
    "deployer",
    "agent",
    "environment-admin",
    "release-manager",
    "approver",
    "policy-admin",
    "evaluator",
    "auditor",
    "release-service",
    "admin",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_of_every_contract_has_a_row() {
        use prost::Message as _;
        let set = prost_types::FileDescriptorSet::decode(proto::FILE_DESCRIPTOR_SET)
            .expect("descriptor set");
        let mut methods = 0;
        for file in &set.file {
            let package = file.package();
            for service in &file.service {
                for method in &service.method {
                    let path = format!("/{package}.{}/{}", service.name(), method.name());
                    assert!(lookup(&path).is_some(), "{path} has no authorization rule");
                    methods += 1;
                }
            }
        }
        assert!(methods > 50, "only {methods} methods in the contracts");
    }

    #[test]
    fn every_path_is_unique_and_every_role_is_known() {
        let mut paths: Vec<_> = TABLE.iter().map(|r| r.path).collect();
        paths.sort_unstable();
        let before = paths.len();
        paths.dedup();
        assert_eq!(before, paths.len(), "a path appears twice");
        for r in ROLES {
            assert!(role(r).is_some(), "{r}");
        }
        assert!(role("root").is_none());
        assert!(!role("viewer")
            .is_some_and(|p| p.contains(P::DeploymentsCreate) || p.contains(P::AuditRead)));
        assert!(role("admin").is_some_and(|p| Permission::ALL.iter().all(|x| p.contains(*x))));
    }
}
