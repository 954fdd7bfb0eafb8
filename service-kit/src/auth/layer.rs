//! The tower layer that authenticates and authorizes every call before routing: a method
//! without a row in the table, a caller without credentials or without the method's
//! permission never reaches a handler.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::body::Body;

use super::Auth;
use crate::tls::ConnInfo;

/// Adds [`AuthService`] in front of a server's routes.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    auth: Arc<Auth>,
}

impl AuthLayer {
    /// The layer enforcing `auth`.
    pub fn new(auth: Arc<Auth>) -> Self {
        Self { auth }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            auth: self.auth.clone(),
        }
    }
}

/// See [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Arc<Auth>,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S> tower::Service<http::Request<Body>> for AuthService<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let checked = self.auth.check(
            req.uri().path(),
            req.headers(),
            req.extensions().get::<ConnInfo>(),
        );
        match checked {
            Ok(caller) => {
                let slot = if caller.rule.permission == super::Permission::Health {
                    match self.auth.health_slot() {
                        Some(slot) => slot,
                        None => {
                            let status = tonic::Status::resource_exhausted(
                                "too many health checks at once; retry",
                            );
                            return Box::pin(std::future::ready(Ok(status.into_http())));
                        }
                    }
                } else {
                    None
                };
                if let Some(slot) = req.extensions().get::<crate::access::PrincipalSlot>() {
                    slot.set(caller.principal());
                }
                req.extensions_mut().insert(caller);
                // The service that was polled ready handles this call; its clone waits
                // for the next.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                let call = inner.call(req);
                Box::pin(async move {
                    let response = call.await;
                    drop(slot);
                    response
                })
            }
            Err(status) => Box::pin(std::future::ready(Ok(status.into_http()))),
        }
    }
}
