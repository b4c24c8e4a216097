//! A call's deadline (`grpc-timeout`) ends it with DEADLINE_EXCEEDED, as Go
//! servers (containerd, CRI-O) end it and as critest's "public image should
//! timeout if requested" checks. tonic enforces the header itself but
//! answers CANCELLED, and its timeout sits outside every layer huskd can
//! add; so the connection's header rewriter ([`super::authority`]) moves
//! the header aside as [`DEADLINE_HEADER`], and [`DeadlineLayer`] enforces
//! it here. Dropping the call's future on expiry cancels its work (a pull
//! stops where it is).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

/// Where the rewriter puts a request's `grpc-timeout`.
pub const DEADLINE_HEADER: &str = "husk-grpc-timeout";

/// A `grpc-timeout` value: at most 8 digits and a unit (H M S m u n).
pub fn parse_timeout(v: &[u8]) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(n * 3600),
        b"M" => Duration::from_secs(n * 60),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        b"u" => Duration::from_micros(n),
        b"n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[derive(Clone, Copy, Default)]
pub struct DeadlineLayer;

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline { inner }
    }
}

#[derive(Clone)]
pub struct Deadline<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for Deadline<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let limit = req
            .headers()
            .get(DEADLINE_HEADER)
            .and_then(|v| parse_timeout(v.as_bytes()));
        let path = req.uri().path().to_owned();
        let call = self.inner.call(req);
        Box::pin(async move {
            let Some(limit) = limit else {
                return call.await;
            };
            match tokio::time::timeout(limit, call).await {
                Ok(r) => r,
                Err(_) => Ok(tonic::Status::deadline_exceeded(format!(
                    "{path}: the call's deadline ({limit:?}) passed before it finished"
                ))
                .into_http()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Layer, Service, ServiceExt};

    #[test]
    fn grpc_timeouts_parse_as_the_spec_writes_them() {
        assert_eq!(parse_timeout(b"1m"), Some(Duration::from_millis(1)));
        assert_eq!(parse_timeout(b"30S"), Some(Duration::from_secs(30)));
        assert_eq!(parse_timeout(b"2H"), Some(Duration::from_secs(7200)));
        assert_eq!(
            parse_timeout(b"999999u"),
            Some(Duration::from_micros(999_999))
        );
        assert_eq!(parse_timeout(b"5n"), Some(Duration::from_nanos(5)));
        for bad in [&b""[..], b"m", b"12", b"1x", b"123456789S", b"-1S", b"1.5S"] {
            assert_eq!(parse_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_call_past_its_deadline_answers_deadline_exceeded() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let slow = tower::service_fn(|req: http::Request<()>| async move {
                let wait = if req.uri().path() == "/slow" { 5000 } else { 0 };
                tokio::time::sleep(Duration::from_millis(wait)).await;
                Ok::<_, std::convert::Infallible>(http::Response::new(String::from("done")))
            });
            let mut svc = DeadlineLayer.layer(slow);
            let req = |path: &str, timeout: Option<&str>| {
                let mut b = http::Request::builder().uri(path);
                if let Some(t) = timeout {
                    b = b.header(DEADLINE_HEADER, t);
                }
                b.body(()).unwrap()
            };
            let t0 = std::time::Instant::now();
            let r = svc
                .ready()
                .await
                .unwrap()
                .call(req("/slow", Some("50m")))
                .await;
            let r = r.unwrap();
            assert!(t0.elapsed() < Duration::from_secs(4));
            assert_eq!(r.headers()["grpc-status"], "4");
            assert!(r.body().is_empty());
            for (path, t) in [("/fast", Some("10S")), ("/fast", None)] {
                let r = svc.ready().await.unwrap().call(req(path, t)).await.unwrap();
                assert_eq!(r.body(), "done");
                assert!(r.headers().get("grpc-status").is_none());
            }
        });
    }
}
