//! Responses the gateway makes itself, and the one table that turns errors into responses.

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, StatusCode};
use mirror_plugins::{LocalResponse, Plugin, RequestState};
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::{Error, ErrorSource, ErrorType};

/// Header that tells which cache outcome a response had.
pub const CACHE_STATUS_HEADER: &str = "x-cache-status";
/// The `X-Cache-Status` field name, made once at compile time.
const CACHE_STATUS: HeaderName = HeaderName::from_static(CACHE_STATUS_HEADER);

/// Writes `local` to the client, with `X-Cache-Status: BYPASS` and the other fields of
/// [`insert_gateway_fields`] set after the domain's plugins' response filters. Returns the
/// number of body bytes written.
pub async fn write_local(
    session: &mut Session,
    local: LocalResponse,
    plugins: &[std::sync::Arc<dyn Plugin>],
    state: &RequestState,
) -> pingora::Result<u64> {
    let mut header = ResponseHeader::build(local.status, Some(local.headers.len() + 3))?;
    for (name, value) in local.headers {
        header.append_header(name, value)?;
    }
    header.insert_header(http::header::CONTENT_LENGTH, local.body.len())?;
    for plugin in plugins {
        plugin.response_filter(&mut header, state)?;
    }
    insert_gateway_fields(&mut header, state, "BYPASS", [], PolicyField::Omit);
    let head_only = session.req_header().method == Method::HEAD || local.body.is_empty();
    session
        .write_response_header(Box::new(header), head_only)
        .await?;
    if head_only {
        return Ok(0);
    }
    let len = local.body.len() as u64;
    session.write_response_body(Some(local.body), true).await?;
    Ok(len)
}

/// Whether a response gets the `Cache-Control` of the request's `ttl` rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyField {
    /// Set it on 2xx and 304 responses.
    Apply,
    /// Keep what the response has: the origin forbade shared caches to keep it (`no-store`,
    /// `private`, `Set-Cookie`, credentials it saw, `Vary: *`), or the gateway made it.
    Omit,
}

/// Sets the fields the gateway adds to every downstream response: `leading`, `X-Cache-Status`
/// with `cache_status`, the cache policy's `Cache-Control` unless `policy` omits it, and the
/// budget's `RateLimit-*` fields. They go in with one insert, because each insert moves the
/// whole header map.
pub fn insert_gateway_fields(
    resp: &mut ResponseHeader,
    state: &RequestState,
    cache_status: &'static str,
    leading: impl IntoIterator<Item = (HeaderName, HeaderValue)>,
    policy: PolicyField,
) {
    let leading = leading.into_iter();
    let cache_control = match policy {
        PolicyField::Apply => state.cache_control(resp.status),
        PolicyField::Omit => None,
    };
    let budget = state.budget_fields();
    // The leading fields, the status, `Cache-Control` and three budget fields at most.
    let count = leading.size_hint().0 + 5;
    mirror_plugins::fields::edit(resp, count, |headers| {
        for (name, value) in leading {
            headers.insert(name, value);
        }
        headers.insert(CACHE_STATUS, HeaderValue::from_static(cache_status));
        if let Some((name, value)) = cache_control {
            headers.insert(name, value);
        }
        if let Some(fields) = budget {
            for (name, value) in fields {
                headers.insert(name, value);
            }
        }
    });
}

/// Builds a plain-text error response: the status line's reason and one line of detail.
pub fn error_response(status: StatusCode, detail: &str) -> LocalResponse {
    let reason = status.canonical_reason().unwrap_or("Error");
    let mut response =
        LocalResponse::text(status, &format!("{} {reason}: {detail}\n", status.as_u16()));
    if status == StatusCode::METHOD_NOT_ALLOWED {
        response = response.with_header(http::header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    response
}

/// Maps a proxy error to the status sent downstream; 0 means the client connection is gone.
///
/// Timeouts talking to the origin become 504, other origin failures 502, malformed client
/// requests 400, and anything unrecognised 500.
pub fn status_for_error(e: &Error) -> u16 {
    use ErrorType::*;
    match (e.etype(), e.esource()) {
        (HTTPStatus(code), _) => *code,
        // A client that stopped reading (`send_timeout_secs`) or sending, or closed the
        // connection: no response can reach it, and the origin did nothing wrong.
        (
            WriteError | ReadError | ConnectionClosed | WriteTimedout | ReadTimedout,
            ErrorSource::Downstream,
        ) => 0,
        (_, ErrorSource::Downstream) => 400,
        (ConnectTimedout | ReadTimedout | WriteTimedout, _) => 504,
        (_, ErrorSource::Upstream) => 502,
        (_, ErrorSource::Internal | ErrorSource::Unset) => 500,
    }
}

/// Sends the error page for `code`, with the not-stored `reason` as `X-Cache-Reason` when
/// given, if the response has not started.
pub async fn write_error(
    session: &mut Session,
    code: u16,
    cache_status: &'static str,
    reason: Option<&str>,
    state: &RequestState,
) {
    let detail = match code {
        502 => "the origin could not be reached or sent an invalid response",
        504 => "the origin did not answer in time",
        400 => "the request is malformed",
        _ => "the gateway failed to handle the request",
    };
    write_error_detail(session, code, cache_status, detail, reason, state).await;
}

/// Sends the error page for `code` with the line `detail` and, when given, the not-stored
/// `reason` as `X-Cache-Reason`, if the response has not started. It carries the fields of
/// [`insert_gateway_fields`] too, so a request counted against a budget reports it.
pub async fn write_error_detail(
    session: &mut Session,
    code: u16,
    cache_status: &'static str,
    detail: &str,
    reason: Option<&str>,
    state: &RequestState,
) {
    if session.response_written().is_some() {
        return;
    }
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let local = error_response(status, detail);
    let result = async {
        let mut header = ResponseHeader::build(local.status, Some(local.headers.len() + 7))?;
        for (name, value) in local.headers {
            header.append_header(name, value)?;
        }
        header.insert_header(http::header::CONTENT_LENGTH, local.body.len())?;
        if let Some(reason) = reason {
            header.insert_header("x-cache-reason", reason)?;
        }
        insert_gateway_fields(&mut header, state, cache_status, [], PolicyField::Omit);
        session.set_keepalive(None);
        session
            .write_response_header(Box::new(header), false)
            .await?;
        session
            .write_response_body(Some(Bytes::clone(&local.body)), true)
            .await
    }
    .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, "cannot send the error response downstream");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_status_by_source() {
        let up = |etype| Error::new(etype).into_up();
        let down = |etype| Error::new(etype).into_down();
        assert_eq!(status_for_error(&up(ErrorType::ReadTimedout)), 504);
        assert_eq!(status_for_error(&up(ErrorType::ConnectTimedout)), 504);
        assert_eq!(status_for_error(&up(ErrorType::ConnectRefused)), 502);
        assert_eq!(status_for_error(&down(ErrorType::WriteTimedout)), 0);
        assert_eq!(status_for_error(&down(ErrorType::ReadTimedout)), 0);
        assert_eq!(status_for_error(&down(ErrorType::WriteError)), 0);
        assert_eq!(status_for_error(&down(ErrorType::ConnectionClosed)), 0);
        assert_eq!(status_for_error(&down(ErrorType::InvalidHTTPHeader)), 400);
        assert_eq!(status_for_error(&Error::new(ErrorType::InternalError)), 500);
        assert_eq!(status_for_error(&up(ErrorType::HTTPStatus(429))), 429);
    }
}
