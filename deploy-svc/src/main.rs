//! The deploy-svc binary: configuration, logging, bind, signals.

use clap::Parser;
use deploy_svc::domain::clock::SystemClock;
use deploy_svc::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let traces = service_kit::init_tracing(&config.log, "deploy-svc")?;
    let listen = config.listen;
    let server = deploy_svc::Server::open(config, std::sync::Arc::new(SystemClock))?;
    let listener = tokio::net::TcpListener::bind(listen).await?;
    // The one line on stdout, once the store is open: tests and scripts started with port 0
    // read the bound address from it.
    #[allow(clippy::print_stdout)]
    {
        println!("deploy-svc listening on {}", listener.local_addr()?);
    }
    let result = server.run(listener, service_kit::shutdown_signal()).await;
    traces.shutdown().await;
    result
}
