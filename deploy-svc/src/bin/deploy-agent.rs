//! The deploy agent: runs on (or for) a target, places what deploy-svc orders there. See
//! `deploy_svc::agent_runner` and `deploy_svc::agent`.

use clap::Parser;

/// Deploy agent: registers a target with deploy-svc and places the artifacts it is ordered
/// to place under --root.
#[derive(Debug, Parser)]
#[command(name = "deploy-agent", version)]
struct Args {
    #[command(flatten)]
    agent: deploy_svc::agent_runner::AgentConfig,
    #[command(flatten)]
    log: service_kit::LogArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    service_kit::init_tracing(&args.log);
    let stop = tokio_util::sync::CancellationToken::new();
    let on_signal = stop.clone();
    tokio::spawn(async move {
        service_kit::shutdown_signal().await;
        on_signal.cancel();
    });
    #[allow(clippy::print_stdout)]
    {
        println!(
            "deploy-agent for environments/{}/targets/{} started",
            args.agent.environment, args.agent.target
        );
    }
    deploy_svc::agent_runner::run(args.agent, stop).await
}
