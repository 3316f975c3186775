//! MQTT over WebSocket: the HTTP upgrade on path `/mqtt` with subprotocol `mqtt`, and an adapter
//! that presents the binary WebSocket messages as a plain byte stream to the connection driver.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

/// The path MQTT clients connect to.
pub const PATH: &str = "/mqtt";

/// Performs the WebSocket handshake on `stream`, accepting only `/mqtt` with subprotocol `mqtt`.
pub async fn accept<S>(stream: S, max_message_size: usize) -> Result<WsByteStream<S>, WsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let config = WebSocketConfig::default().max_message_size(Some(max_message_size)).max_frame_size(Some(max_message_size));
    let ws = tokio_tungstenite::accept_hdr_async_with_config(stream, check_upgrade, Some(config)).await?;
    Ok(WsByteStream { ws, read: Bytes::new() })
}

// The signature is tungstenite's handshake callback; its error type is not ours to shrink.
#[allow(clippy::result_large_err)]
fn check_upgrade(request: &Request, mut response: Response) -> Result<Response, ErrorResponse> {
    if request.uri().path() != PATH {
        return Err(reject(StatusCode::NOT_FOUND, format!("MQTT over WebSocket is served on {PATH}")));
    }
    let offers_mqtt = request
        .headers()
        .get_all("Sec-WebSocket-Protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == "mqtt");
    if !offers_mqtt {
        return Err(reject(StatusCode::BAD_REQUEST, "the WebSocket subprotocol must be \"mqtt\"".into()));
    }
    response.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
    Ok(response)
}

fn reject(status: StatusCode, body: String) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(body));
    *response.status_mut() = status;
    response
}

/// A WebSocket connection seen as a byte stream: each binary message's bytes are read in turn;
/// each write is sent as one binary message.
pub struct WsByteStream<S> {
    ws: WebSocketStream<S>,
    read: Bytes,
}

fn to_io(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        other => io::Error::other(other),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsByteStream<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        while self.read.is_empty() {
            match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(data))) => self.read = data,
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, "MQTT over WebSocket must use binary messages")));
                }
                Some(Ok(Message::Close(_))) | None => return Poll::Ready(Ok(())),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
            }
        }
        let n = self.read.len().min(buf.remaining());
        buf.put_slice(&self.read[..n]);
        self.read.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsByteStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(to_io)?;
        Pin::new(&mut self.ws).start_send(Message::Binary(Bytes::copy_from_slice(data))).map_err(to_io)?;
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_flush(cx).map_err(to_io)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_close(cx).map_err(to_io)
    }
}
