//! One-line descriptions of storage failures, cause first. `object_store` errors carry
//! the method, URL, retry counts and the server's XML body; a user needs the cause and
//! where it happened. The full text stays available for `--verbose`.

use std::error::Error as StdError;

/// Where requests go: an endpoint URL (or `s3://bucket` on AWS) or a local directory,
/// and the bucket, named when the server refuses something.
#[derive(Debug, Clone)]
pub struct Place {
    pub endpoint: String,
    pub bucket: Option<String>,
}

/// Why a request (`op` on `key`) to `place` failed.
pub fn summarize(err: &object_store::Error, place: &Place, op: &str, key: &str) -> String {
    let texts: Vec<String> = sources(err).map(|e| e.to_string()).collect();
    if let Some(status) = texts.iter().find_map(|t| status_in(t)) {
        let body = texts.iter().find(|t| t.contains("<Code>"));
        let at = match &place.bucket {
            Some(b) => format!("{}, bucket {b}", place.endpoint),
            None => place.endpoint.clone(),
        };
        let (what, why) = refused(status, body.map(String::as_str), &at);
        return format!("{what}: {op} {key} ({why})");
    }
    let place = &place.endpoint;
    if let Some(http) =
        sources(err).find_map(|e| e.downcast_ref::<object_store::client::HttpError>())
    {
        let root = sources(http)
            .last()
            .map_or_else(String::new, |e| e.to_string());
        return format!("cannot reach {place}: {}", plain(&root));
    }
    match err {
        object_store::Error::PermissionDenied { .. } => format!("{place}: access denied"),
        object_store::Error::Unauthenticated { .. } => {
            format!("{place}: the credentials were not accepted")
        }
        _ => {
            let root = texts.last().map_or("", String::as_str);
            format!("{place}: {}", plain(root))
        }
    }
}

/// Every error of the chain, outermost first.
fn sources<'a>(
    err: &'a (dyn StdError + 'static),
) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    std::iter::successors(Some(err), |e: &&'a (dyn StdError + 'static)| (*e).source())
}

/// The HTTP status in object_store's "non-2xx status code: 404 Not Found: …".
fn status_in(text: &str) -> Option<u16> {
    let rest = text.split_once("status code: ")?.1;
    let digits = rest.get(..3)?;
    digits.parse().ok().filter(|s| (100..600).contains(s))
}

/// A refusal from the server in words, and the server's code, status and place.
fn refused(status: u16, body: Option<&str>, place: &str) -> (String, String) {
    let code = body.and_then(|b| xml_field(b, "Code"));
    let message = body.and_then(|b| xml_field(b, "Message"));
    let what = match (code.and_then(known_code), message) {
        (Some(words), _) => words.to_string(),
        (None, Some(m)) => m.to_string(),
        (None, None) => generic_reason(status).to_string(),
    };
    let code = code.map_or_else(String::new, |c| format!("{c}, "));
    (what, format!("{code}HTTP {status} from {place}"))
}

/// The S3 error codes of common mistakes, in words that say what to fix.
fn known_code(code: &str) -> Option<&'static str> {
    Some(match code {
        "NoSuchBucket" => "the bucket does not exist",
        "AccessDenied" => "access denied",
        "InvalidAccessKeyId" => "the access key id is not known to the server",
        "SignatureDoesNotMatch" => "the secret access key is wrong",
        "RequestTimeTooSkewed" => "this machine's clock is too far from the server's",
        _ => return None,
    })
}

fn generic_reason(status: u16) -> &'static str {
    match status {
        401 => "the credentials were not accepted",
        403 => "access denied",
        404 => "not found",
        429 => "too many requests",
        500..=599 => "the storage server failed",
        _ => "the storage server refused the request",
    }
}

/// The text of `<name>…</name>` in an S3 error body.
fn xml_field<'a>(body: &'a str, name: &str) -> Option<&'a str> {
    let start = body.find(&format!("<{name}>"))? + name.len() + 2;
    let len = body.get(start..)?.find(&format!("</{name}>"))?;
    body.get(start..start + len)
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// An OS error as a phrase: "Connection refused (os error 111)" → "connection refused".
pub(crate) fn plain(text: &str) -> String {
    let text = match text.find(" (os error ") {
        Some(i) => &text[..i],
        None => text,
    };
    let mut chars = text.chars();
    match (chars.next(), chars.next()) {
        (Some(first), Some(second)) if first.is_uppercase() && second.is_lowercase() => first
            .to_lowercase()
            .chain(text[first.len_utf8()..].chars())
            .collect(),
        _ => text.to_string(),
    }
}

/// The whole chain, for `--verbose`: each distinct message once, without the parts of
/// an S3 error body that echo the signed request (they can carry a session token).
pub fn detail(err: &object_store::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for e in sources(err) {
        let s = redact(&e.to_string());
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ")
}

/// Elements of an S3 error body that repeat what was signed.
const ECHOED: [&str; 4] = [
    "CanonicalRequest",
    "CanonicalRequestBytes",
    "StringToSign",
    "StringToSignBytes",
];

fn redact(text: &str) -> String {
    let mut out = text.to_string();
    for name in ECHOED {
        let (open, close) = (format!("<{name}>"), format!("</{name}>"));
        while let Some(start) = out.find(&open) {
            let Some(len) = out[start..].find(&close) else {
                out.truncate(start);
                break;
            };
            out.replace_range(start..start + len + close.len(), "");
        }
    }
    out
}

/// An endpoint URL without `user:password@`, fit to print.
pub fn without_userinfo(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_body_fields_are_found() {
        assert_eq!(
            status_in("Server returned non-2xx status code: 404 Not Found: <x/>"),
            Some(404)
        );
        assert_eq!(status_in("status code: 4"), None);
        let body = "<Error><Code>SlowDown</Code><Message>Reduce your rate</Message></Error>";
        assert_eq!(
            refused(503, Some(body), "http://h"),
            (
                "Reduce your rate".into(),
                "SlowDown, HTTP 503 from http://h".into()
            )
        );
        let body = "<Error><Code>NoSuchBucket</Code></Error>";
        assert_eq!(
            refused(404, Some(body), "http://h").0,
            "the bucket does not exist"
        );
        assert_eq!(
            refused(403, None, "http://h"),
            ("access denied".into(), "HTTP 403 from http://h".into())
        );
        assert_eq!(xml_field("<Code></Code>", "Code"), None);
        assert_eq!(xml_field("<Code>unterminated", "Code"), None);
    }

    #[test]
    fn nothing_signed_or_secret_is_printed() {
        let body = "<Error><Code>SignatureDoesNotMatch</Code><CanonicalRequest>GET\nx-amz-security-token:SECRET</CanonicalRequest><StringToSign>AWS4 SECRET</StringToSign></Error>";
        let r = redact(body);
        assert!(
            !r.contains("SECRET") && r.contains("SignatureDoesNotMatch"),
            "{r}"
        );
        assert!(!redact("<StringToSign>SECRET").contains("SECRET"));
        assert_eq!(
            without_userinfo("http://ak:sk@host:9000/x@y"),
            "http://host:9000/x@y"
        );
        assert_eq!(without_userinfo("http://host:9000"), "http://host:9000");
        assert_eq!(without_userinfo("no scheme"), "no scheme");
    }

    #[test]
    fn os_errors_read_as_phrases() {
        assert_eq!(
            plain("Connection refused (os error 111)"),
            "connection refused"
        );
        assert_eq!(plain("TLS handshake"), "TLS handshake");
        assert_eq!(plain(""), "");
    }
}
