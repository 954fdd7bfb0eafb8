//! The console binary: options, logs, bind, signals. See the `console` library.

use clap::Parser;

/// Web console for deploy-svc and release-svc.
#[derive(Debug, Parser)]
#[command(name = "console", version)]
struct Args {
    #[command(flatten)]
    console: console::Config,
    #[command(flatten)]
    log: service_kit::LogArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let traces = service_kit::init_tracing(&args.log, "console")?;
    let listener = tokio::net::TcpListener::bind(args.console.listen).await?;
    let addr = listener.local_addr()?;
    #[allow(clippy::print_stdout)]
    {
        // The last word is the address: tests and scripts read it from here.
        println!("console listening on {addr}");
    }
    tracing::info!(url = %format!("http://{addr}/"), "console serving");
    if !addr.ip().is_loopback() {
        tracing::warn!(
            address = %addr,
            "the console is reachable beyond this machine: put a proxy that signs people in and forwards their bearer token in front of it"
        );
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let on_signal = stop.clone();
    tokio::spawn(async move {
        service_kit::shutdown_signal().await;
        on_signal.cancel();
    });
    let result = console::serve(listener, args.console, stop).await;
    traces.shutdown().await;
    result
}
