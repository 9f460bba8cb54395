//! The protocol-neutral request view.
//!
//! The router and the filters read a request through [`RequestView`]: a
//! method, a path, an authority and headers (or, for RPC protocols, metadata)
//! looked up by key. `http::Request` and `http::request::Parts` implement it
//! by borrowing, so an HTTP request is never copied into another map to be
//! routed; an RPC codec implements it on its own message type and gets the
//! same routing for free.

/// A read-only view of a request, as routing and filters need it.
pub trait RequestView {
    /// The method (`GET`, or the RPC method name).
    fn method(&self) -> &str;
    /// The path without the query string (for RPC: the service path).
    fn path(&self) -> &str;
    /// The query string without the leading `?`, if any.
    fn query(&self) -> Option<&str>;
    /// The authority (`:authority`, or the `Host` header).
    fn authority(&self) -> Option<&str>;
    /// The scheme, when the request carries one.
    fn scheme(&self) -> Option<&str>;
    /// The first value of a header / metadata key (`name` is lower-case).
    /// Values that are not valid UTF-8 are reported as absent.
    fn header(&self, name: &str) -> Option<&str>;
    /// How many values the header has (0 when absent).
    fn header_count(&self, name: &str) -> usize {
        usize::from(self.header(name).is_some())
    }
    /// Every value of a header joined with `,` (Envoy's rule for matching a
    /// header that appears more than once). Borrowed when there is one value.
    fn header_joined(&self, name: &str) -> Option<std::borrow::Cow<'_, str>> {
        self.header(name).map(std::borrow::Cow::Borrowed)
    }
    /// The value of a pseudo-header (`:path` with query, `:method`,
    /// `:authority`, `:scheme`) or a regular header.
    fn pseudo_or_header(&self, name: &str) -> Option<std::borrow::Cow<'_, str>> {
        match name {
            ":method" => Some(std::borrow::Cow::Borrowed(self.method())),
            ":authority" => self.authority().map(std::borrow::Cow::Borrowed),
            ":scheme" => self.scheme().map(std::borrow::Cow::Borrowed),
            ":path" => Some(match self.query() {
                Some(q) => std::borrow::Cow::Owned(format!("{}?{}", self.path(), q)),
                None => std::borrow::Cow::Borrowed(self.path()),
            }),
            _ => self.header_joined(name),
        }
    }
}

fn header_str<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
}

fn header_joined<'a>(
    headers: &'a http::HeaderMap,
    name: &str,
) -> Option<std::borrow::Cow<'a, str>> {
    let mut values = headers.get_all(name).iter();
    let first = std::str::from_utf8(values.next()?.as_bytes()).ok()?;
    let mut rest = values.peekable();
    if rest.peek().is_none() {
        return Some(std::borrow::Cow::Borrowed(first));
    }
    let mut joined = first.to_owned();
    for v in rest {
        joined.push(',');
        joined.push_str(std::str::from_utf8(v.as_bytes()).ok()?);
    }
    Some(std::borrow::Cow::Owned(joined))
}

impl RequestView for http::request::Parts {
    fn method(&self) -> &str {
        self.method.as_str()
    }
    fn path(&self) -> &str {
        self.uri.path()
    }
    fn query(&self) -> Option<&str> {
        self.uri.query()
    }
    fn authority(&self) -> Option<&str> {
        match self.uri.authority() {
            Some(a) => Some(a.as_str()),
            None => header_str(&self.headers, "host"),
        }
    }
    fn scheme(&self) -> Option<&str> {
        self.uri.scheme_str()
    }
    fn header(&self, name: &str) -> Option<&str> {
        header_str(&self.headers, name)
    }
    fn header_count(&self, name: &str) -> usize {
        self.headers.get_all(name).iter().count()
    }
    fn header_joined(&self, name: &str) -> Option<std::borrow::Cow<'_, str>> {
        header_joined(&self.headers, name)
    }
}

impl<B> RequestView for http::Request<B> {
    fn method(&self) -> &str {
        self.method().as_str()
    }
    fn path(&self) -> &str {
        self.uri().path()
    }
    fn query(&self) -> Option<&str> {
        self.uri().query()
    }
    fn authority(&self) -> Option<&str> {
        match self.uri().authority() {
            Some(a) => Some(a.as_str()),
            None => header_str(self.headers(), "host"),
        }
    }
    fn scheme(&self) -> Option<&str> {
        self.uri().scheme_str()
    }
    fn header(&self, name: &str) -> Option<&str> {
        header_str(self.headers(), name)
    }
    fn header_count(&self, name: &str) -> usize {
        self.headers().get_all(name).iter().count()
    }
    fn header_joined(&self, name: &str) -> Option<std::borrow::Cow<'_, str>> {
        header_joined(self.headers(), name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_request_is_viewed_without_copying() {
        let req = http::Request::builder()
            .uri("/a/b?x=1&y")
            .header("host", "example.com:8080")
            .header("x-multi", "1")
            .header("x-multi", "2")
            .body(())
            .unwrap();
        assert_eq!(RequestView::method(&req), "GET");
        assert_eq!(RequestView::path(&req), "/a/b");
        assert_eq!(RequestView::query(&req), Some("x=1&y"));
        assert_eq!(RequestView::authority(&req), Some("example.com:8080"));
        assert_eq!(req.header_count("x-multi"), 2);
        assert_eq!(req.header_joined("x-multi").as_deref(), Some("1,2"));
        assert_eq!(req.pseudo_or_header(":path").as_deref(), Some("/a/b?x=1&y"));
    }

    #[test]
    fn absolute_form_authority_wins_over_host() {
        let req = http::Request::builder()
            .uri("http://a.example/x")
            .header("host", "b.example")
            .body(())
            .unwrap();
        assert_eq!(RequestView::authority(&req), Some("a.example"));
    }
}
