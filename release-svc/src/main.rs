//! The release-svc binary: configuration, logging, bind, signals.

use clap::Parser;
use release_svc::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut config = Config::parse();
    let traces = service_kit::init_tracing(&config.log, "release-svc")?;
    if let Some(command) = config.command.take() {
        let result = release_svc::cli::run(command).await;
        traces.shutdown().await;
        return result;
    }
    let (listen, flagd_listen, ofrep_listen) =
        (config.listen, config.flagd_listen, config.ofrep_listen);
    let server = release_svc::Server::open(config).await?;
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let flagd_listener = match flagd_listen {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await?),
        None => None,
    };
    let ofrep_listener = match ofrep_listen {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await?),
        None => None,
    };
    // The one line on stdout, once the state is loaded: tests and scripts started with
    // port 0 read the bound address from it.
    #[allow(clippy::print_stdout)]
    {
        println!("release-svc listening on {}", listener.local_addr()?);
        if let Some(l) = &flagd_listener {
            println!(
                "release-svc flagd protocols listening on {}",
                l.local_addr()?
            );
        }
        if let Some(l) = &ofrep_listener {
            println!("release-svc OFREP listening on {}", l.local_addr()?);
        }
    }
    let result = server
        .run_with_ports(
            listener,
            flagd_listener,
            ofrep_listener,
            service_kit::shutdown_signal(),
        )
        .await;
    traces.shutdown().await;
    result
}
