//! Outbound gRPC channels (release-svc to deploy-svc, agents to deploy-svc, the command
//! line clients) with TLS, an optional client certificate (mutual TLS) and an optional
//! bearer token read from a file (re-read when it changes, as Kubernetes rotates projected
//! service-account tokens). With trace export on, every call also carries the W3C
//! `traceparent` of the span it is made in ([`crate::otel::inject`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::reload::Reloading;

/// How a client proves who it is and checks whom it talks to.
#[derive(Debug, Clone, Default)]
pub struct ClientSecurity {
    /// PEM bundle of the CAs the server's certificate must chain to; turns TLS on.
    pub ca: Option<PathBuf>,
    /// PEM client certificate chain (mutual TLS).
    pub cert: Option<PathBuf>,
    /// PEM key of `cert`.
    pub key: Option<PathBuf>,
    /// A file holding a bearer token (a JWT or a static token), sent on every call.
    pub token_file: Option<PathBuf>,
}

/// Client options for command-line clients (the agent, one-shot commands), flattened.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientArgs {
    /// PEM CA bundle the server's certificate must chain to: turns TLS on (the server
    /// address must then be `https://`).
    #[arg(long = "ca", env = "CLIENT_CA")]
    pub ca: Option<PathBuf>,
    /// PEM client certificate (mutual TLS).
    #[arg(long = "cert", env = "CLIENT_CERT", requires = "key")]
    pub cert: Option<PathBuf>,
    /// PEM key of `--cert`.
    #[arg(long = "key", env = "CLIENT_KEY", requires = "cert")]
    pub key: Option<PathBuf>,
    /// File holding a bearer token sent on every call (re-read when it changes).
    #[arg(long = "token-file", env = "CLIENT_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

impl ClientArgs {
    /// The security these flags describe.
    pub fn security(&self) -> ClientSecurity {
        ClientSecurity {
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            token_file: self.token_file.clone(),
        }
    }
}

/// A channel whose calls carry the bearer token, if any.
pub type AuthChannel = InterceptedService<Channel, Bearer>;

/// Adds `authorization: Bearer <token>` to every call, and the current span's
/// `traceparent` while traces are exported.
#[derive(Debug, Clone, Default)]
pub struct Bearer(Option<Arc<Reloading<String>>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        crate::otel::inject(req.metadata_mut());
        if let Some(token) = &self.0 {
            let value = MetadataValue::try_from(format!("Bearer {}", token.get().0))
                .map_err(|_| tonic::Status::internal("the token file holds an invalid token"))?;
            req.metadata_mut().insert("authorization", value);
        }
        Ok(req)
    }
}

fn token(bytes: &[u8]) -> anyhow::Result<String> {
    let text = std::str::from_utf8(bytes)?.trim().to_owned();
    anyhow::ensure!(!text.is_empty(), "the token file is empty");
    anyhow::ensure!(
        text.bytes().all(|b| b.is_ascii_graphic()),
        "the token file holds characters a header cannot carry"
    );
    Ok(text)
}

impl ClientSecurity {
    /// The endpoint for `url` (TLS when a CA is set or the URL is `https://`).
    pub fn endpoint(&self, url: &str) -> anyhow::Result<Endpoint> {
        let endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|_| anyhow::anyhow!("bad server address {}", crate::redact::url(url)))?
            .connect_timeout(Duration::from_secs(5))
            // A peer that stops answering (frozen, partitioned) is noticed on idle
            // connections too: HTTP/2 pings every 10 s, dead after 5 s without a reply.
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
            .tcp_nodelay(true);
        let tls = self.ca.is_some() || url.starts_with("https://");
        if !tls {
            anyhow::ensure!(
                self.cert.is_none(),
                "a client certificate needs TLS: give a CA and an https:// address"
            );
            return Ok(endpoint);
        }
        anyhow::ensure!(
            url.starts_with("https://"),
            "TLS is configured: the server address must start with https://"
        );
        let Some(ca) = &self.ca else {
            anyhow::bail!("an https:// server needs a CA bundle to check its certificate");
        };
        let pem = std::fs::read(ca)
            .map_err(|e| anyhow::anyhow!("cannot read the CA bundle {}: {e}", ca.display()))?;
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let cert = std::fs::read(cert).map_err(|e| {
                    anyhow::anyhow!("cannot read the client certificate {}: {e}", cert.display())
                })?;
                let key = std::fs::read(key)
                    .map_err(|_| anyhow::anyhow!("cannot read the client key {}", key.display()))?;
                config = config.identity(Identity::from_pem(cert, key));
            }
            (None, None) => {}
            _ => anyhow::bail!("a client certificate needs both its certificate and key files"),
        }
        Ok(endpoint.tls_config(config)?)
    }

    /// The bearer interceptor (reading the token file now, so a bad file fails early).
    pub fn bearer(&self) -> anyhow::Result<Bearer> {
        match &self.token_file {
            None => Ok(Bearer(None)),
            Some(path) => Ok(Bearer(Some(Arc::new(Reloading::load(
                path.clone(),
                "token",
                token,
            )?)))),
        }
    }

    /// Connects to `url`.
    pub async fn connect(&self, url: &str) -> anyhow::Result<AuthChannel> {
        let bearer = self.bearer()?;
        let channel = self.endpoint(url)?.connect().await?;
        Ok(InterceptedService::new(channel, bearer))
    }

    /// A channel to `url` that connects on first use (and reconnects after failures).
    pub fn connect_lazy(&self, url: &str) -> anyhow::Result<AuthChannel> {
        let bearer = self.bearer()?;
        Ok(InterceptedService::new(
            self.endpoint(url)?.connect_lazy(),
            bearer,
        ))
    }
}
