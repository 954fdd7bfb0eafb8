//! The deploy-svc binary: configuration, logging, bind, signals.

use clap::Parser;
use deploy_svc::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    service_kit::init_tracing(&config.log);
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    // The one line on stdout: tests and scripts started with port 0 read the bound address.
    #[allow(clippy::print_stdout)]
    {
        println!("deploy-svc listening on {}", listener.local_addr()?);
    }
    deploy_svc::serve(listener, config, service_kit::shutdown_signal()).await
}
