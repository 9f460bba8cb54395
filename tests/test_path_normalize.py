"""HCM path normalisation (`normalize_path`, `merge_slashes`,
`path_with_escaped_slashes_action`) under Envoy and mesh, the same requests.

Paths are sent exactly as written (like `curl --path-as-is`); the
observation is the status, which upstream answered (`/b...` routes to `b`,
everything else to `a`) and the path it saw, or the proxy's own reply.
`[envoy]` checks the expectations here against Envoy; `[mesh]` checks mesh
against Envoy's live observations.
"""

from __future__ import annotations

import pytest

from test_differential import (  # noqa: F401 - cluster_ports is a fixture
    Case,
    Req,
    cluster_ports,
    envoy_reference,
    made,
    mismatches,
    run_case,
    up,
    vhost_all,
)

ROUTES = vhost_all("""
  - match: {prefix: "/b"}
    route: {cluster: b}
  - match: {prefix: "/"}
    route: {cluster: a}
""")

CASES = [
    Case("normalize_path", ROUTES, [
        Req("/x/../b/1", expect=up("b", "/b/1")),
        Req("/x/./y", expect=up("a", "/x/y")),
        Req("/../../b", expect=up("b", "/b")),
        Req("/x/%2e%2E/b/2", expect=up("b", "/b/2")),
        Req("/%62/%7Eu", expect=up("b", "/b/~u")),
        Req("/x%2fy", expect=up("a", "/x%2fy")),
        Req("/x%zz", expect=up("a", "/x%zz")),
        Req("/x%2", expect=up("a", "/x%2")),
        Req("/x//y?q=/../z", expect=up("a", "/x//y?q=/../z")),
    ], hcm_extra={"normalize_path": True}),
    Case("normalize_and_merge_slashes", ROUTES, [
        Req("//b///c", expect=up("b", "/b/c")),
        Req("/x/.//../b", expect=up("a", "/x/b")),
    ], hcm_extra={"normalize_path": True, "merge_slashes": True}),
    Case("without_normalisation_paths_pass_unchanged", ROUTES, [
        Req("/x/../b/1", expect=up("a", "/x/../b/1")),
        Req("/x%2Fy", expect=up("a", "/x%2Fy")),
    ]),
    Case("escaped_slashes_reject", ROUTES, [
        Req("/x%2Fy", expect=made(400)),
        Req("/x%5cy", expect=made(400)),
        Req("/x/y", expect=up("a", "/x/y")),
    ], hcm_extra={"path_with_escaped_slashes_action": "REJECT_REQUEST"}),
    Case("escaped_slashes_redirect", ROUTES, [
        Req("/x%2fy?q=1", resp=("location",), expect=made(307, resp={"location": ["/x/y?q=1"]})),
        Req("/x/y", expect=up("a", "/x/y")),
    ], hcm_extra={"path_with_escaped_slashes_action": "UNESCAPE_AND_REDIRECT"}),
    Case("escaped_slashes_forward", ROUTES, [
        Req("/x%2F..%2Fb", expect=up("b", "/b")),
        Req("/b%2Fc", expect=up("b", "/b/c")),
    ], hcm_extra={"path_with_escaped_slashes_action": "UNESCAPE_AND_FORWARD",
                  "normalize_path": True}),
    Case("escaped_slashes_keep", ROUTES, [
        Req("/x%2Fy", expect=up("a", "/x%2Fy")),
    ], hcm_extra={"path_with_escaped_slashes_action": "KEEP_UNCHANGED"}),
]


@pytest.mark.parametrize("proto", ["h1", "h2"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_path_normalisation(case: Case, kind: str, proto: str, cluster_ports):
    got = run_case(kind, case, cluster_ports, proto)
    if kind == "envoy":
        want = [r.expected(proto) for r in case.requests]
        want_name = "expected"
    else:
        want, want_name = envoy_reference(case, cluster_ports, proto), "envoy"
    bad = mismatches(case, got, want, kind, want_name)
    assert not bad, f"case {case.id}: {len(bad)} request(s) differ:\n" + "\n".join(bad)
