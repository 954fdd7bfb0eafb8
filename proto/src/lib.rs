//! The gRPC contracts of the pair, compiled from `proto/` at build time.
//!
//! # Layout
//!
//! - [`deploy::v1`]: the `deploy.v1` package (Deployment Management).
//! - [`release::v1`]: the `release.v1` package (Release Management).
//! - [`flagd::evaluation::v2`] and [`flagd::evaluation::v1`]: flagd's evaluation protocols
//!   (current and deprecated), and [`flagd::sync::v1`], flagd's sync protocol for
//!   in-process providers, served by release-svc.
//! - [`FILE_DESCRIPTOR_SET`]: every compiled file with source info, for gRPC reflection
//!   (v1 and v1alpha), so `grpcurl describe` shows the doc comments.
//! - `proto/`: the `.proto` sources (packages deploy.v1, release.v1, flagd.evaluation.v1
//!   and v2, flagd.sync.v1, and google.rpc's error details), compiled by `build.rs` with protox (no
//!   `protoc` needed).
//!
//! Generated code is exempt from the workspace lints.

/// The `deploy` package family.
pub mod deploy {
    /// `deploy.v1`: environments, targets, artifacts, deployments, placement events.
    #[allow(clippy::all, clippy::pedantic, missing_docs, unused_qualifications)]
    pub mod v1 {
        tonic::include_proto!("deploy.v1");
    }
}

/// The `release` package family.
pub mod release {
    /// `release.v1`: features, releases, visibility decisions.
    #[allow(clippy::all, clippy::pedantic, missing_docs, unused_qualifications)]
    pub mod v1 {
        tonic::include_proto!("release.v1");
    }
}

/// The flagd protocol packages, wire-compatible with the public ones.
pub mod flagd {
    /// `flagd.evaluation`.
    pub mod evaluation {
        /// `flagd.evaluation.v1`: the deprecated protocol older providers speak.
        #[allow(clippy::all, clippy::pedantic, missing_docs, unused_qualifications)]
        pub mod v1 {
            tonic::include_proto!("flagd.evaluation.v1");
        }

        /// `flagd.evaluation.v2`: the evaluation protocol of current flagd providers.
        #[allow(clippy::all, clippy::pedantic, missing_docs, unused_qualifications)]
        pub mod v2 {
            tonic::include_proto!("flagd.evaluation.v2");
        }
    }

    /// `flagd.sync`.
    pub mod sync {
        /// `flagd.sync.v1`: flag definitions for in-process providers.
        #[allow(clippy::all, clippy::pedantic, missing_docs, unused_qualifications)]
        pub mod v1 {
            tonic::include_proto!("flagd.sync.v1");
        }
    }
}

/// Encoded `google.protobuf.FileDescriptorSet` of every contract, with source info.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));
