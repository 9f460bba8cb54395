"""The same bootstrap YAML under Envoy and under mesh, the same requests.

Every case is one route configuration (YAML below) plus a list of requests,
sent once over HTTP/1.1 and once over h2c (prior knowledge) to a listener
with the default codec_type AUTO.
Each request is reduced to an *observation*: status, which upstream answered
and the path/headers it saw, selected response headers, and for
proxy-made responses the body. Header comparisons only cover headers the
test controls (never date/server/x-envoy-*/x-request-id values).

- `[envoy]` asserts Envoy's observations equal the expectations written here
  (so the expectations are checked against the reference implementation);
- `[mesh]` asserts mesh's observations equal Envoy's, obtained live from the
  same YAML in the same worker.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import yaml

import harness

DEAD_BODY_PREFIX = "upstream connect error or disconnect/reset before headers"


# --------------------------------------------------------------------------
# case model


@dataclass
class Req:
    path: str
    host: str = "example.com"
    method: str = "GET"
    headers: list = field(default_factory=list)
    body: bytes | None = None
    seen: tuple = ()  # request headers to report as seen by the upstream
    resp: tuple = ()  # response headers to report
    body_prefix: int | None = None  # compare only this many chars of a proxy-made body
    repeat: int = 1  # >1: observe the set of statuses/upstreams over N requests
    expect: dict | None = None
    expect_h2: dict | None = None  # when HTTP/2 differs from HTTP/1.1
    protos: tuple = ("h1", "h2")  # protocols this request is sent over

    def expected(self, proto: str) -> dict | None:
        return self.expect_h2 if (proto == "h2" and self.expect_h2 is not None) else self.expect

    def describe(self) -> str:
        def short(v: str) -> str:
            return v if len(v) <= 24 else f"{v[:12]}...({len(v)} chars)"

        h = "".join(f" {k}:{short(v)}" for k, v in self.headers)
        rep = f" x{self.repeat}" if self.repeat > 1 else ""
        return f"{self.method} {self.host}{self.path}{h}{rep}"


@dataclass
class Case:
    id: str
    route_config: str
    requests: list
    hcm_extra: dict | None = None

    def __str__(self):
        return self.id


def up(name: str, path: str, seen: dict | None = None, resp: dict | None = None,
       status: int = 200) -> dict:
    o = {"status": status, "upstream": name, "path": path}
    if seen is not None:
        o["seen"] = seen
    if resp is not None:
        o["resp"] = resp
    return o


def made(status: int, body: str = "", resp: dict | None = None) -> dict:
    """A response made by the proxy itself (no upstream)."""
    o = {"status": status, "upstream": None, "body": body}
    if resp is not None:
        o["resp"] = resp
    return o


def _split(values: list[str]) -> list[str]:
    out = []
    for v in values:
        out += [p.strip() for p in v.split(",")]
    return out


def send(port: int, req: Req, proto: str) -> harness.Response:
    fn = harness.request if proto == "h1" else harness.h2_request
    return fn(port, req.method, req.path, headers=req.headers, body=req.body, host=req.host)


def observe_one(port: int, req: Req, proto: str) -> dict:
    try:
        r = send(port, req, proto)
    except (ConnectionError, OSError) as e:
        # no response at all (reset, GOAWAY, closed): that is the observation
        return {"error": type(e).__name__ if not str(e).startswith("h2:") else str(e)}
    o: dict = {"status": r.status, "upstream": r.upstream}
    if r.upstream is not None and not r.body and req.method == "HEAD":
        o["path"] = None  # no body to tell
    elif r.upstream is not None and r.status in (204, 304):
        o["path"] = None
    elif r.upstream is not None:
        info = r.json()
        o["path"] = info["path"]
        if req.seen:
            o["seen"] = {
                h: (_split([info["headers"][h]]) if h in info["headers"] else None)
                for h in req.seen
            }
    else:
        body = r.body.decode("utf-8", "replace")
        if req.body_prefix is not None:
            body = body[: req.body_prefix]
        o["body"] = body
    if req.resp:
        o["resp"] = {h: (_split(r.header_all(h)) or None) for h in req.resp}
    return o


def observe(port: int, req: Req, proto: str) -> dict:
    if req.repeat == 1:
        return observe_one(port, req, proto)
    statuses, upstreams = set(), set()
    for _ in range(req.repeat):
        r = send(port, req, proto)
        statuses.add(r.status)
        upstreams.add(r.upstream or "-")
    return {"statuses": sorted(statuses), "upstreams": sorted(upstreams)}


# --------------------------------------------------------------------------
# cases


def vhost_all(routes_yaml: str, extra: str = "") -> str:
    return f"""
virtual_hosts:
- name: all
  domains: ["*"]
{extra}  routes:
{routes_yaml}
"""


CASES = [
    Case(
        "prefix",
        vhost_all("""
  - match: {prefix: "/api"}
    route: {cluster: a}
  - match: {prefix: "/"}
    route: {cluster: b}
"""),
        [
            Req("/api", expect=up("a", "/api")),
            Req("/api/users?id=7", expect=up("a", "/api/users?id=7")),
            Req("/apix", expect=up("a", "/apix")),  # a string prefix, not a segment
            Req("/API", expect=up("b", "/API")),  # case sensitive by default
            Req("/other", expect=up("b", "/other")),
            Req("/", method="POST", body=b"x" * 10, expect=up("b", "/")),
        ],
    ),
    Case(
        "exact_path",
        vhost_all("""
  - match: {path: "/exact"}
    route: {cluster: a}
  - match: {prefix: "/"}
    route: {cluster: b}
"""),
        [
            Req("/exact", expect=up("a", "/exact")),
            Req("/exact?q=1", expect=up("a", "/exact?q=1")),  # the query is not part of the path
            Req("/exact/", expect=up("b", "/exact/")),
            Req("/exactly", expect=up("b", "/exactly")),
            Req("/Exact", expect=up("b", "/Exact")),
        ],
    ),
    Case(
        "safe_regex",
        vhost_all("""
  - match: {safe_regex: {regex: "/items/[0-9]+"}}
    route: {cluster: a}
  - match: {safe_regex: {regex: "/v[12]/.*"}}
    route: {cluster: a}
  - match: {prefix: "/"}
    route: {cluster: b}
"""),
        [
            Req("/items/123", expect=up("a", "/items/123")),
            Req("/items/42?x=1", expect=up("a", "/items/42?x=1")),
            # the regex must match the whole path, not a part of it
            Req("/items/123/x", expect=up("b", "/items/123/x")),
            Req("/x/items/1", expect=up("b", "/x/items/1")),
            Req("/items/abc", expect=up("b", "/items/abc")),
            Req("/v2/thing", expect=up("a", "/v2/thing")),
            Req("/v3/thing", expect=up("b", "/v3/thing")),
        ],
    ),
    Case(
        "regex_with_prefix_rewrite",
        vhost_all("""
  - match: {safe_regex: {regex: "/v[12]/.*"}}
    route: {cluster: a, prefix_rewrite: "/"}
  - match: {prefix: "/"}
    route: {cluster: b}
"""),
        [
            # Envoy accepts this; the "prefix" a regex match replaces is the whole path
            Req("/v2/thing", expect=up("a", "/")),
            Req("/v1/x?q=1", expect=up("a", "/?q=1")),
            Req("/v3/thing", expect=up("b", "/v3/thing")),
        ],
    ),
    Case(
        "case_insensitive",
        vhost_all("""
  - match: {prefix: "/Foo", case_sensitive: false}
    route: {cluster: a}
  - match: {path: "/Exact", case_sensitive: false}
    route: {cluster: a}
  - match: {prefix: "/Bar"}
    route: {cluster: a}
  - match: {prefix: "/"}
    route: {cluster: b}
"""),
        [
            Req("/foo/bar", expect=up("a", "/foo/bar")),
            Req("/FOO", expect=up("a", "/FOO")),
            Req("/fo", expect=up("b", "/fo")),
            Req("/eXaCt", expect=up("a", "/eXaCt")),
            Req("/exact/", expect=up("b", "/exact/")),
            Req("/bar", expect=up("b", "/bar")),
            Req("/Bar", expect=up("a", "/Bar")),
        ],
    ),
    Case(
        "separated_prefix_and_grpc_match",
        vhost_all("""
  - match: {path_separated_prefix: "/api"}
    route: {cluster: a}
  - match: {prefix: "/svc/", grpc: {}}
    route: {cluster: a}
  - match: {prefix: "/"}
    route: {cluster: b}
"""),
        [
            Req("/api", expect=up("a", "/api")),
            Req("/api/", expect=up("a", "/api/")),
            Req("/api/x?y=1", expect=up("a", "/api/x?y=1")),
            Req("/api?y=1", expect=up("a", "/api?y=1")),
            Req("/apix", expect=up("b", "/apix")),  # a segment, not a string prefix
            Req("/svc/M", method="POST", headers=[("content-type", "application/grpc")],
                body=b"", expect=up("a", "/svc/M")),
            Req("/svc/M", method="POST", headers=[("content-type", "application/grpc+proto")],
                body=b"", expect=up("a", "/svc/M")),
            Req("/svc/M", method="POST", headers=[("content-type", "application/json")],
                body=b"", expect=up("b", "/svc/M")),
        ],
    ),
    Case(
        "header_matchers",
        vhost_all("""
  - match:
      prefix: "/inv"
      headers: [{name: x-invert, string_match: {exact: "no"}, invert_match: true}]
    direct_response: {status: 200, body: {inline_string: "r-invert"}}
  - match:
      prefix: "/inv"
    direct_response: {status: 200, body: {inline_string: "r-inv-default"}}
  - match:
      prefix: "/"
      headers: [{name: x-exact, string_match: {exact: "yes"}}]
    direct_response: {status: 200, body: {inline_string: "r-exact"}}
  - match:
      prefix: "/"
      headers: [{name: x-prefix, string_match: {prefix: "ab"}}]
    direct_response: {status: 200, body: {inline_string: "r-prefix"}}
  - match:
      prefix: "/"
      headers: [{name: x-present, present_match: true}]
    direct_response: {status: 200, body: {inline_string: "r-present"}}
  - match:
      prefix: "/"
      headers: [{name: x-regex, string_match: {safe_regex: {regex: "v[0-9]+"}}}]
    direct_response: {status: 200, body: {inline_string: "r-regex"}}
  - match:
      prefix: "/"
      headers:
      - {name: x-one, string_match: {exact: "1"}}
      - {name: x-two, string_match: {exact: "2"}}
    direct_response: {status: 200, body: {inline_string: "r-both"}}
  - match:
      prefix: "/"
      headers: [{name: ":method", string_match: {exact: "DELETE"}}]
    direct_response: {status: 200, body: {inline_string: "r-method"}}
  - match: {prefix: "/"}
    direct_response: {status: 200, body: {inline_string: "default"}}
"""),
        [
            Req("/", headers=[("x-exact", "yes")], expect=made(200, "r-exact")),
            Req("/", headers=[("x-exact", "YES")], expect=made(200, "default")),
            Req("/", headers=[("x-exact", "yes!")], expect=made(200, "default")),
            Req("/", headers=[("x-prefix", "abc")], expect=made(200, "r-prefix")),
            Req("/", headers=[("x-prefix", "xab")], expect=made(200, "default")),
            Req("/", headers=[("x-present", "")], expect=made(200, "r-present")),
            Req("/", headers=[("x-present", "anything")], expect=made(200, "r-present")),
            Req("/", headers=[("x-regex", "v12")], expect=made(200, "r-regex")),
            Req("/", headers=[("x-regex", "v12x")], expect=made(200, "default")),
            Req("/", headers=[("x-one", "1"), ("x-two", "2")], expect=made(200, "r-both")),
            Req("/", headers=[("x-one", "1")], expect=made(200, "default")),
            Req("/", method="DELETE", expect=made(200, "r-method")),
            Req("/", expect=made(200, "default")),
            # an absent header does not match, inverted or not
            Req("/inv", expect=made(200, "r-inv-default")),
            Req("/inv", headers=[("x-invert", "no")], expect=made(200, "r-inv-default")),
            Req("/inv", headers=[("x-invert", "yes")], expect=made(200, "r-invert")),
        ],
    ),
    Case(
        "query_parameters",
        vhost_all("""
  - match:
      prefix: "/"
      query_parameters: [{name: debug, string_match: {exact: "1"}}]
    direct_response: {status: 200, body: {inline_string: "q-exact"}}
  - match:
      prefix: "/"
      query_parameters: [{name: flag, present_match: true}]
    direct_response: {status: 200, body: {inline_string: "q-present"}}
  - match:
      prefix: "/"
      query_parameters: [{name: v, string_match: {safe_regex: {regex: "[0-9]+"}}}]
    direct_response: {status: 200, body: {inline_string: "q-regex"}}
  - match:
      prefix: "/"
      query_parameters: [{name: p, string_match: {prefix: "ab"}}]
    direct_response: {status: 200, body: {inline_string: "q-prefix"}}
  - match: {prefix: "/"}
    direct_response: {status: 200, body: {inline_string: "default"}}
"""),
        [
            Req("/?debug=1", expect=made(200, "q-exact")),
            Req("/path?x=1&debug=1", expect=made(200, "q-exact")),
            Req("/?debug=2", expect=made(200, "default")),
            Req("/?debug=10", expect=made(200, "default")),
            Req("/?flag", expect=made(200, "q-present")),
            Req("/?flag=anything", expect=made(200, "q-present")),
            Req("/?v=123", expect=made(200, "q-regex")),
            Req("/?v=12a", expect=made(200, "default")),
            Req("/?p=abc", expect=made(200, "q-prefix")),
            Req("/?p=cab", expect=made(200, "default")),
            Req("/", expect=made(200, "default")),
            Req("/debug=1", expect=made(200, "default")),
        ],
    ),
    Case(
        "domains",
        """
virtual_hosts:
- name: exact
  domains: ["api.example.com"]
  routes: [{match: {prefix: "/"}, direct_response: {status: 200, body: {inline_string: "vh-exact"}}}]
- name: suffix
  domains: ["*.example.com"]
  routes: [{match: {prefix: "/"}, direct_response: {status: 200, body: {inline_string: "vh-suffix"}}}]
- name: longer-suffix
  domains: ["*.foo.example.com"]
  routes: [{match: {prefix: "/"}, direct_response: {status: 200, body: {inline_string: "vh-longer-suffix"}}}]
- name: prefix
  domains: ["foo.*"]
  routes: [{match: {prefix: "/"}, direct_response: {status: 200, body: {inline_string: "vh-prefix"}}}]
- name: with-port
  domains: ["port.example.org:8080"]
  routes: [{match: {prefix: "/"}, direct_response: {status: 200, body: {inline_string: "vh-port"}}}]
- name: any
  domains: ["*"]
  routes: [{match: {prefix: "/"}, direct_response: {status: 200, body: {inline_string: "vh-any"}}}]
""",
        [
            Req("/", host="api.example.com", expect=made(200, "vh-exact")),
            Req("/", host="API.Example.COM", expect=made(200, "vh-exact")),
            Req("/", host="x.example.com", expect=made(200, "vh-suffix")),
            Req("/", host="a.foo.example.com", expect=made(200, "vh-longer-suffix")),
            Req("/", host="foo.example.com", expect=made(200, "vh-suffix")),  # suffix beats prefix
            Req("/", host="foo.bar", expect=made(200, "vh-prefix")),
            Req("/", host="example.com", expect=made(200, "vh-any")),
            Req("/", host="port.example.org:8080", expect=made(200, "vh-port")),
            Req("/", host="port.example.org", expect=made(200, "vh-any")),
            # without strip_*_host_port the port is part of the host that is matched
            Req("/", host="api.example.com:8080", expect=made(200, "vh-any")),
            Req("/", host="x.example.com:8080", expect=made(200, "vh-any")),
            Req("/", host="elsewhere.net", expect=made(200, "vh-any")),
        ],
    ),
    Case(
        "weighted_clusters",
        vhost_all("""
  - match: {prefix: "/zero"}
    route:
      weighted_clusters:
        clusters:
        - {name: a, weight: 0}
        - {name: b, weight: 10}
  - match: {prefix: "/all-a"}
    route:
      weighted_clusters:
        clusters:
        - {name: a, weight: 7}
  - match: {prefix: "/half"}
    route:
      weighted_clusters:
        clusters:
        - {name: a, weight: 50}
        - {name: b, weight: 50}
"""),
        [
            Req("/zero", repeat=20, expect={"statuses": [200], "upstreams": ["b"]}),
            Req("/all-a", repeat=10, expect={"statuses": [200], "upstreams": ["a"]}),
            Req("/half", repeat=100, expect={"statuses": [200], "upstreams": ["a", "b"]}),
        ],
    ),
    Case(
        "methods_and_statuses",
        vhost_all("""
  - match: {prefix: "/"}
    route: {cluster: a}
"""),
        [
            Req("/bytes/100", method="HEAD", resp=("content-length",),
                expect={"status": 200, "upstream": "a", "path": None,
                        "resp": {"content-length": ["100"]}}),
            Req("/m", method="PUT", body=b"p" * 1000, expect=up("a", "/m")),
            Req("/m", method="DELETE", expect=up("a", "/m")),
            Req("/m", method="OPTIONS", expect=up("a", "/m")),
            Req("/m", method="PATCH", body=b"{}", expect=up("a", "/m")),
            Req("/status/204", resp=("content-length",),
                expect={"status": 204, "upstream": "a", "path": None,
                        "resp": {"content-length": None}}),
            Req("/status/304", expect={"status": 304, "upstream": "a", "path": None}),
            Req("/status/404", expect=up("a", "/status/404", status=404)),
            Req("/status/503", expect=up("a", "/status/503", status=503)),
            Req("/a%20b/%7Ec?x=%2F", expect=up("a", "/a%20b/%7Ec?x=%2F")),
        ],
    ),
    Case(
        "direct_response",
        vhost_all("""
  - match: {path: "/hello"}
    direct_response: {status: 200, body: {inline_string: "hello direct\\n"}}
  - match: {path: "/teapot"}
    direct_response: {status: 418, body: {inline_string: "short and stout"}}
  - match: {path: "/empty"}
    direct_response: {status: 204}
  - match: {path: "/unavailable"}
    direct_response: {status: 503, body: {inline_string: "down for maintenance"}}
"""),
        [
            Req("/hello", resp=("content-type", "content-length"),
                expect=made(200, "hello direct\n",
                            resp={"content-type": ["text/plain"], "content-length": ["13"]})),
            Req("/teapot", expect=made(418, "short and stout")),
            Req("/empty", expect=made(204, "")),
            Req("/unavailable", expect=made(503, "down for maintenance")),
            Req("/hello", method="POST", body=b"ignored", expect=made(200, "hello direct\n")),
        ],
    ),
    Case(
        "redirect",
        vhost_all("""
  - match: {path: "/old"}
    redirect: {path_redirect: "/new"}
  - match: {path: "/secure"}
    redirect: {https_redirect: true}
  - match: {prefix: "/pre/"}
    redirect: {prefix_rewrite: "/post/"}
  - match: {path: "/found"}
    redirect: {path_redirect: "/there", response_code: FOUND}
  - match: {path: "/temp"}
    redirect: {host_redirect: "other.example.com", response_code: TEMPORARY_REDIRECT}
  - match: {path: "/perm"}
    redirect: {path_redirect: "/p", response_code: PERMANENT_REDIRECT}
  - match: {path: "/see"}
    redirect: {path_redirect: "/s", response_code: SEE_OTHER}
  - match: {path: "/strip"}
    redirect: {path_redirect: "/stripped", strip_query: true}
  - match: {path: "/scheme"}
    redirect: {scheme_redirect: "https", host_redirect: "secure.example.com", port_redirect: 8443}
"""),
        [
            Req("/old", host="redir.example.com", resp=("location",),
                expect=made(301, resp={"location": ["http://redir.example.com/new"]})),
            Req("/old?a=1", host="redir.example.com", resp=("location",),
                expect=made(301, resp={"location": ["http://redir.example.com/new?a=1"]})),
            Req("/secure", host="redir.example.com", resp=("location",),
                expect=made(301, resp={"location": ["https://redir.example.com/secure"]})),
            Req("/pre/x/y", host="redir.example.com", resp=("location",),
                expect=made(301, resp={"location": ["http://redir.example.com/post/x/y"]})),
            Req("/found", host="redir.example.com", resp=("location",),
                expect=made(302, resp={"location": ["http://redir.example.com/there"]})),
            Req("/temp", host="redir.example.com", resp=("location",),
                expect=made(307, resp={"location": ["http://other.example.com/temp"]})),
            Req("/perm", host="redir.example.com", resp=("location",),
                expect=made(308, resp={"location": ["http://redir.example.com/p"]})),
            Req("/see", host="redir.example.com", resp=("location",),
                expect=made(303, resp={"location": ["http://redir.example.com/s"]})),
            Req("/strip?a=1&b=2", host="redir.example.com", resp=("location",),
                expect=made(301, resp={"location": ["http://redir.example.com/stripped"]})),
            Req("/scheme", host="redir.example.com", resp=("location",),
                expect=made(301, resp={"location": ["https://secure.example.com:8443/scheme"]})),
        ],
    ),
    Case(
        "rewrite",
        vhost_all("""
  - match: {prefix: "/api/"}
    route: {cluster: a, prefix_rewrite: "/v2/", host_rewrite_literal: "upstream.internal"}
  - match: {prefix: "/strip/"}
    route: {cluster: a, prefix_rewrite: "/"}
  - match: {path: "/root"}
    route: {cluster: a, prefix_rewrite: "/index.html"}
  - match: {safe_regex: {regex: "/users/[0-9]+/profile"}}
    route:
      cluster: b
      regex_rewrite:
        pattern: {regex: "^/users/([0-9]+)/profile$"}
        substitution: "/profile/\\\\1"
  - match: {prefix: "/"}
    route: {cluster: b}
"""),
        [
            Req("/api/users?x=1", seen=("host",),
                expect=up("a", "/v2/users?x=1", seen={"host": ["upstream.internal"]})),
            Req("/api/", seen=("host",), expect=up("a", "/v2/", seen={"host": ["upstream.internal"]})),
            Req("/strip/foo/bar", seen=("host",),
                expect=up("a", "/foo/bar", seen={"host": ["example.com"]})),
            Req("/root?q", expect=up("a", "/index.html?q")),
            Req("/users/42/profile", expect=up("b", "/profile/42")),
            Req("/apix", seen=("host",), expect=up("b", "/apix", seen={"host": ["example.com"]})),
        ],
    ),
    Case(
        "header_mutation",
        """
request_headers_to_add:
- header: {key: x-rc, value: rc}
- header: {key: x-level, value: rc}
  append_action: APPEND_IF_EXISTS_OR_ADD
- header: {key: x-append, value: rc}
  append_action: APPEND_IF_EXISTS_OR_ADD
- header: {key: x-ov-level, value: rc}
  append_action: OVERWRITE_IF_EXISTS_OR_ADD
request_headers_to_remove: [x-remove-rc]
response_headers_to_add:
- header: {key: x-resp-rc, value: rc}
- header: {key: x-resp-existing, value: proxy}
  append_action: OVERWRITE_IF_EXISTS_OR_ADD
- header: {key: x-resp-keep, value: proxy}
  append_action: ADD_IF_ABSENT
- header: {key: x-resp-append, value: proxy}
  append_action: APPEND_IF_EXISTS_OR_ADD
response_headers_to_remove: [x-upstream-secret]
virtual_hosts:
- name: all
  domains: ["*"]
  request_headers_to_add:
  - header: {key: x-vh, value: vh}
  - header: {key: x-level, value: vh}
    append_action: APPEND_IF_EXISTS_OR_ADD
  - header: {key: x-client-ov, value: vh}
    append_action: OVERWRITE_IF_EXISTS_OR_ADD
  - header: {key: x-ov-level, value: vh}
    append_action: OVERWRITE_IF_EXISTS_OR_ADD
  request_headers_to_remove: [x-remove-vh]
  response_headers_to_add:
  - header: {key: x-resp-vh, value: vh}
  response_headers_to_remove: [x-upstream-vh-secret]
  routes:
  - match: {prefix: "/direct"}
    direct_response: {status: 200, body: {inline_string: "direct"}}
    response_headers_to_add:
    - header: {key: x-resp-route, value: route}
  - match: {prefix: "/"}
    route: {cluster: a}
    request_headers_to_add:
    - header: {key: x-route, value: route}
    - header: {key: x-level, value: route}
      append_action: APPEND_IF_EXISTS_OR_ADD
    - header: {key: x-client-keep, value: route}
      append_action: ADD_IF_ABSENT
    - header: {key: x-only-if, value: route}
      append_action: OVERWRITE_IF_EXISTS
    - header: {key: x-ov-level, value: route}
      append_action: OVERWRITE_IF_EXISTS_OR_ADD
    request_headers_to_remove: [x-remove-route]
    response_headers_to_add:
    - header: {key: x-resp-route, value: route}
""",
        [
            Req("/h",
                headers=[("x-client-keep", "c"), ("x-client-ov", "c"), ("x-append", "c"),
                         ("x-remove-rc", "1"), ("x-remove-vh", "1"), ("x-remove-route", "1"),
                         ("x-keep-me", "1")],
                seen=("x-rc", "x-vh", "x-route", "x-level", "x-client-keep", "x-client-ov",
                      "x-append", "x-only-if", "x-ov-level", "x-remove-rc", "x-remove-vh",
                      "x-remove-route", "x-keep-me"),
                expect=up("a", "/h", seen={
                    "x-rc": ["rc"], "x-vh": ["vh"], "x-route": ["route"],
                    "x-level": ["route", "vh", "rc"], "x-client-keep": ["c"],
                    "x-client-ov": ["vh"], "x-append": ["c", "rc"], "x-only-if": None,
                    "x-ov-level": ["rc"], "x-remove-rc": None, "x-remove-vh": None,
                    "x-remove-route": None, "x-keep-me": ["1"],
                })),
            Req("/h2", headers=[("x-only-if", "c")], seen=("x-only-if",),
                expect=up("a", "/h2", seen={"x-only-if": ["route"]})),
            Req("/resp",
                headers=[("x-respond-x-resp-existing", "up"), ("x-respond-x-resp-keep", "up"),
                         ("x-respond-x-resp-append", "up"), ("x-respond-x-upstream-secret", "s"),
                         ("x-respond-x-upstream-vh-secret", "s"), ("x-respond-x-other", "o")],
                resp=("x-resp-rc", "x-resp-vh", "x-resp-route", "x-resp-existing",
                      "x-resp-keep", "x-resp-append", "x-upstream-secret",
                      "x-upstream-vh-secret", "x-other"),
                expect=up("a", "/resp", resp={
                    "x-resp-rc": ["rc"], "x-resp-vh": ["vh"], "x-resp-route": ["route"],
                    "x-resp-existing": ["proxy"], "x-resp-keep": ["up"],
                    "x-resp-append": ["up", "proxy"], "x-upstream-secret": None,
                    "x-upstream-vh-secret": None, "x-other": ["o"],
                })),
            Req("/direct", resp=("x-resp-rc", "x-resp-vh", "x-resp-route"),
                expect=made(200, "direct", resp={
                    "x-resp-rc": ["rc"], "x-resp-vh": ["vh"], "x-resp-route": ["route"]})),
        ],
    ),
    Case(
        "hcm_options",
        vhost_all("""
  - match: {prefix: "/"}
    route: {cluster: a}
"""),
        [
            Req("/opts", seen=("x-request-id",), resp=("server",),
                expect=up("a", "/opts", seen={"x-request-id": None},
                          resp={"server": ["edge-proxy"]})),
            # 70 KiB of headers (7 x 10 KiB: the upstream limits single lines to 64 KiB)
            Req("/opts", headers=[(f"x-big-{i}", "v" * 10240) for i in range(7)],
                seen=("x-request-id",), expect=up("a", "/opts", seen={"x-request-id": None})),
            # HTTP/1.1 only: over HTTP/2 Envoy resets the stream instead of answering 431
            Req("/opts", headers=[(f"x-big-{i}", "v" * 10240) for i in range(9)],
                protos=("h1",), expect=made(431, "Request Header Fields Too Large")),
        ],
        hcm_extra={"server_name": "edge-proxy", "generate_request_id": False,
                   "max_request_headers_kb": 80},
    ),
    Case(
        "no_route",
        """
virtual_hosts:
- name: known
  domains: ["known.example.com"]
  routes:
  - match: {prefix: "/only"}
    route: {cluster: a}
""",
        [
            Req("/only/x", host="known.example.com", expect=up("a", "/only/x")),
            Req("/other", host="known.example.com", expect=made(404, "")),
            Req("/only", host="unknown.example.com", expect=made(404, "")),
            Req("/", host="known.example.com", method="POST", body=b"abc", expect=made(404, "")),
        ],
    ),
    Case(
        "upstream_unavailable",
        vhost_all("""
  - match: {prefix: "/dead"}
    route: {cluster: dead}
  - match: {prefix: "/empty"}
    route: {cluster: empty}
  - match: {prefix: "/garbage"}
    route: {cluster: garbage}
  - match: {prefix: "/hangup"}
    route: {cluster: hangup}
  - match: {prefix: "/"}
    route: {cluster: a}
"""),
        [
            Req("/dead", body_prefix=len(DEAD_BODY_PREFIX), expect=made(503, DEAD_BODY_PREFIX)),
            Req("/dead", method="POST", body=b"payload", body_prefix=len(DEAD_BODY_PREFIX),
                expect=made(503, DEAD_BODY_PREFIX)),
            Req("/empty", expect=made(503, "no healthy upstream")),
            # the upstream answers something that is not HTTP: a protocol error, 502
            Req("/garbage", body_prefix=len(DEAD_BODY_PREFIX),
                expect=made(502, DEAD_BODY_PREFIX)),
            # the upstream closes the connection without answering
            Req("/hangup", body_prefix=len(DEAD_BODY_PREFIX),
                expect=made(503, DEAD_BODY_PREFIX)),
            Req("/alive", expect=up("a", "/alive")),
        ],
    ),
    Case(
        "route_timeout",
        vhost_all("""
  - match: {prefix: "/delay/"}
    route: {cluster: a, timeout: 0.5s}
  - match: {prefix: "/"}
    route: {cluster: a, timeout: 0s}
"""),
        [
            Req("/delay/3", expect=made(504, "upstream request timeout")),
            Req("/delay/0.05", expect=up("a", "/delay/0.05")),
            Req("/status/201", expect=up("a", "/status/201", status=201)),
            Req("/status/500", expect=up("a", "/status/500", status=500)),
        ],
    ),
]


# --------------------------------------------------------------------------
# running


@pytest.fixture(scope="module")
def cluster_ports(upstream_a, upstream_b, refused, garbage_upstream, hangup_upstream):
    return {"a": upstream_a.port, "b": upstream_b.port, "dead": refused,
            "garbage": garbage_upstream.port, "hangup": hangup_upstream.port}


def case_config(case: Case, ports: dict) -> str:
    clusters = [
        harness.static_cluster("a", ports["a"]),
        harness.static_cluster("b", ports["b"]),
        harness.static_cluster("dead", ports["dead"]),
        harness.static_cluster("empty", []),
        harness.static_cluster("garbage", ports["garbage"]),
        harness.static_cluster("hangup", ports["hangup"]),
    ]
    return harness.simple_http_bootstrap(yaml.safe_load(case.route_config), clusters,
                                         case.hcm_extra)


def run_case(kind: str, case: Case, ports: dict, proto: str) -> list[dict]:
    with harness.start_proxy(kind, case_config(case, ports)) as proxy:
        port = proxy.port("ingress")
        obs = [observe(port, r, proto) if proto in r.protos else {"not sent": proto}
               for r in case.requests]
        assert proxy.alive(), f"{kind} died during the case:\n{proxy.stderr_text()[-2000:]}"
        return obs


_envoy_cache: dict[tuple, list[dict]] = {}


def envoy_reference(case: Case, ports: dict, proto: str) -> list[dict]:
    key = (case.id, proto)
    if key not in _envoy_cache:
        _envoy_cache[key] = run_case("envoy", case, ports, proto)
    return _envoy_cache[key]


def mismatches(case: Case, got: list[dict], want: list[dict], got_name: str, want_name: str):
    lines = []
    for req, g, w in zip(case.requests, got, want):
        if g != w:
            lines.append(f"  {req.describe()}\n    {want_name}: {json.dumps(w)}\n"
                         f"    {got_name}: {json.dumps(g)}")
    return lines


@pytest.mark.parametrize("proto", ["h1", "h2"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case: Case, kind: str, proto: str, cluster_ports):
    """HTTP/1.1 and h2c (prior knowledge) clients; listeners use codec_type AUTO."""
    got = run_case(kind, case, cluster_ports, proto)
    if kind == "envoy":
        want = [r.expected(proto) if proto in r.protos else {"not sent": proto}
                for r in case.requests]
        want_name = "expected"
    else:
        want, want_name = envoy_reference(case, cluster_ports, proto), "envoy"
    bad = mismatches(case, got, want, kind, want_name)
    assert not bad, f"case {case.id}: {len(bad)} request(s) differ:\n" + "\n".join(bad)


def test_cases_are_many_and_all_have_expectations():
    assert len(CASES) >= 12
    for c in CASES:
        for r in c.requests:
            assert r.expect is not None, f"{c.id}: {r.describe()} has no expectation"
