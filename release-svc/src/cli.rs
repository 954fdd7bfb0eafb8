//! One-shot commands (`release-svc import-flagd`, `release-svc export-flagd`): clients of a
//! running release-svc, so a team moving from flagd loads its flag files from a shell or a
//! pipeline without grpcurl.

use std::io::Read;

use proto::release::v1 as pb;
use proto::release::v1::release_service_client::ReleaseServiceClient;

use crate::config::Command;

/// Runs `command`; the output goes to stdout, errors to the caller (non-zero exit).
pub async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::ImportFlagd {
            file,
            environment,
            skip_invalid,
            server,
            client,
        } => {
            let document = if file.as_os_str() == "-" {
                let mut text = String::new();
                std::io::stdin().read_to_string(&mut text)?;
                text
            } else {
                std::fs::read_to_string(&file)
                    .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?
            };
            let mut client = ReleaseServiceClient::new(client.security().connect(&server).await?);
            let out = client
                .import_flagd(pb::ImportFlagdRequest {
                    environment,
                    document,
                    skip_invalid,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            let skipped: serde_json::Map<String, serde_json::Value> = out
                .skipped
                .into_iter()
                .map(|s| (s.key, s.problems.into()))
                .collect();
            print(&serde_json::json!({
                "created": out.created,
                "updated": out.updated,
                "unchanged": out.unchanged,
                "skipped": skipped,
                "release": out.release,
            }))
        }
        Command::ExportFlagd {
            environment,
            server,
            client,
        } => {
            let mut client = ReleaseServiceClient::new(client.security().connect(&server).await?);
            let out = client
                .export_flagd(pb::ExportFlagdRequest { environment })
                .await
                .map_err(status_error)?
                .into_inner();
            emit(&out.document)
        }
    }
}

fn print(v: &serde_json::Value) -> anyhow::Result<()> {
    emit(&serde_json::to_string_pretty(v)?)
}

/// Writes `text` and a newline to stdout; a reader that went away (`| head`) ends the
/// output quietly instead of a panic.
fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// A refusal as one readable error: the code, the message and every field violation.
fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}
