//! The deploy agent: runs on (or for) a target, places what deploy-svc orders there. See
//! `deploy_agent::runner` and `deploy_agent::place`.

use std::time::Duration;

use clap::Parser;

/// Deploy agent: registers a target with deploy-svc and places the artifacts it is ordered
/// to place under --root, from the sources it is allowed to read.
#[derive(Debug, Parser)]
#[command(name = "deploy-agent", version)]
struct Args {
    #[command(flatten)]
    agent: deploy_agent::runner::AgentConfig,
    #[command(flatten)]
    log: service_kit::LogArgs,
    #[command(flatten)]
    metrics: service_kit::telemetry::MetricsArgs,
}

/// How long a stopping agent waits for a blocked fetch or hook thread before exiting.
const STOP_GRACE: Duration = Duration::from_secs(2);

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // The trace exporter's channel lives on the runtime.
    let traces = {
        let _runtime = runtime.enter();
        service_kit::init_tracing(&args.log, "deploy-agent")?
    };
    let result = runtime.block_on(async move {
        let stop = tokio_util::sync::CancellationToken::new();
        let on_signal = stop.clone();
        tokio::spawn(async move {
            service_kit::shutdown_signal().await;
            on_signal.cancel();
        });
        let metrics = service_kit::telemetry::serve_metrics(
            &args.metrics,
            deploy_agent::telemetry::describe,
            stop.clone(),
        )
        .await?;
        #[allow(clippy::print_stdout)]
        {
            println!(
                "deploy-agent for environments/{}/targets/{} started",
                args.agent.environment, args.agent.target
            );
        }
        let result = deploy_agent::runner::run(args.agent, stop.clone()).await;
        stop.cancel();
        if let Some(metrics) = metrics {
            let _ = metrics.await;
        }
        traces.shutdown().await;
        result
    });
    // A placement thread blocked in a read or a hook is not waited for: it has been told
    // to stop, and what it leaves in tmp/ is cleaned at the next placement.
    runtime.shutdown_timeout(STOP_GRACE);
    if result.is_ok() {
        tracing::info!("deploy-agent stopped");
    }
    result
}
