"""deploy/kubernetes/ingress/: Keygate as the decision-only service of ingress-nginx, Istio, Traefik and Envoy Gateway.

Checked without a cluster. Core kinds (the Deployment, Service, Ingress, ...)
go through test_artifacts.py like every manifest: the Kubernetes schemas,
locked-down pods. Here: Keygate's own settings (``keygate check-config``),
the Service, probes and NetworkPolicy around the authz listener, and each
custom resource parsed and checked for the fields its ingress needs. Where an
ingress runs Envoy (Istio, Envoy Gateway) or Traefik, its settings must say
what deploy/ingress/ says, because that is what tests/integrations runs for
real.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from .test_artifacts import (
    DEPLOY, KUBERNETES, Manifest, Workload, checked, is_builtin, is_keygate_image, manifests, pod_spec,
    prestop_seconds, resolve_port, selects, workload_settings, yaml_documents,
)

INGRESS = KUBERNETES / "ingress"
ENVOY = DEPLOY / "ingress" / "envoy" / "envoy.yaml"
TRAEFIK_DYNAMIC = DEPLOY / "ingress" / "traefik" / "dynamic.yml"
IDENTITY = ["x-keygate-key-id", "x-keygate-key-name", "x-keygate-org", "x-keygate-user", "x-keygate-role"]
# The custom resources each ingress needs; every other manifest here is a core kind.
CUSTOM_KINDS = {
    ("install.istio.io/v1alpha1", "IstioOperator"), ("security.istio.io/v1", "AuthorizationPolicy"),
    ("traefik.io/v1alpha1", "Middleware"), ("traefik.io/v1alpha1", "IngressRoute"),
    ("gateway.envoyproxy.io/v1alpha1", "SecurityPolicy"), ("gateway.networking.k8s.io/v1beta1", "ReferenceGrant"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"),
}
TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP header name (RFC 9110 token)


def docs(name: str) -> list[dict[str, Any]]:
    return yaml_documents(INGRESS / name)


def one(name: str, kind: str) -> dict[str, Any]:
    (found,) = [d for d in docs(name) if d["kind"] == kind]
    return found


def ingress_manifests() -> list[Manifest]:
    return manifests(INGRESS)


def keygate_workload() -> Workload:
    (manifest,) = [m for m in ingress_manifests() if m.doc["kind"] == "Deployment"]
    spec = pod_spec(manifest.doc)
    assert spec is not None
    (container,) = [c for c in spec["containers"] if is_keygate_image(c["image"])]
    return Workload(INGRESS, manifest, container)


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The settings Keygate's container runs with, as ``keygate check-config`` reads them."""
    env, config = workload_settings(keygate_workload())
    return checked(tmp_path_factory.mktemp("authz-config"), env, config).settings


def service() -> dict[str, Any]:
    return one("service.yaml", "Service")


def keygate_endpoint() -> tuple[str, int]:
    """The host and port every ingress must ask: the Service's cluster DNS name and port."""
    doc = service()
    (port,) = doc["spec"]["ports"]
    return f"{doc['metadata']['name']}.{doc['metadata']['namespace']}.svc.cluster.local", port["port"]


def envoy_authz() -> dict[str, Any]:
    """The ext_authz filter of the tested deploy/ingress/envoy/envoy.yaml."""
    config = yaml.safe_load(ENVOY.read_text())
    (listener,) = config["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (manager,) = chain["filters"]
    (authz,) = [f for f in manager["typed_config"]["http_filters"] if f["name"] == "envoy.filters.http.ext_authz"]
    return authz["typed_config"]  # type: ignore[no-any-return]


def exact_names(matcher: dict[str, Any]) -> list[str]:
    return [p["exact"] for p in matcher["patterns"] if "exact" in p]


def istio_patterns(matcher: dict[str, Any]) -> list[str]:
    """An Envoy ListStringMatcher written the way Istio's header lists are: "name" or "prefix*"."""
    return [p["exact"] if "exact" in p else p["prefix"] + "*" for p in matcher["patterns"]]


# -- what is here --------------------------------------------------------------
def test_every_manifest_is_a_core_kind_or_a_known_custom_resource() -> None:
    """Core kinds are schema-checked by test_artifacts.py; the custom ones are checked below, by name."""
    found = {(m.doc["apiVersion"], m.doc["kind"]) for m in ingress_manifests() if not is_builtin(m.doc)}
    assert found == CUSTOM_KINDS
    core = {m.doc["kind"] for m in ingress_manifests() if is_builtin(m.doc)}
    assert core == {"ConfigMap", "Deployment", "Service", "NetworkPolicy", "PodDisruptionBudget", "Secret", "Job",
                    "Ingress"}


def test_every_manifest_names_its_namespace() -> None:
    """The files refer to each other across namespaces, so none may depend on `kubectl -n`."""
    for manifest in ingress_manifests():
        assert manifest.doc["metadata"].get("namespace"), manifest.id


def test_the_kustomization_applies_keygate_and_no_ingress() -> None:
    """Keygate's resources only; the ingress files are applied one by one, the Job and the Secret by hand."""
    listed = yaml_documents(INGRESS / "kustomization.yaml")[0]["resources"]
    assert set(listed) == {"configmap.yaml", "deployment.yaml", "service.yaml", "pdb.yaml", "networkpolicy.yaml"}
    for name in listed:
        assert all(d["metadata"]["namespace"] == "keygate" for d in docs(name)), name


# -- Keygate -------------------------------------------------------------------
def test_keygate_serves_the_authz_listener_on_every_interface(settings: dict[str, Any]) -> None:
    """authz.listen is on; the proxy listener stays on loopback, unreachable from other pods."""
    assert settings["authz"]["listen"] == "0.0.0.0:8002"
    assert settings["proxy"]["listen"].startswith("127.0.0.1:")
    assert settings["store"]["url"].startswith("postgresql://"), "replicas must share PostgreSQL"


def test_keygate_trusts_the_ingresses_and_says_so(settings: dict[str, Any]) -> None:
    """authz.trusted_proxies is set (else every check is judged as GET of the ingress's own path)."""
    assert settings["authz"]["trusted_proxies"]
    config = one("configmap.yaml", "ConfigMap")["data"]["keygate.toml"]
    assert "networkpolicy.yaml" in config.split("trusted_proxies")[0], "say what keeps other pods out"


def test_the_service_reaches_the_authz_listener_and_nothing_else(settings: dict[str, Any]) -> None:
    doc, workload = service(), keygate_workload()
    labels = workload.manifest.doc["spec"]["template"]["metadata"]["labels"]
    assert selects(doc["spec"]["selector"], labels)
    assert selects(workload.manifest.doc["spec"]["selector"]["matchLabels"], labels)
    authz = int(settings["authz"]["listen"].rsplit(":", 1)[1])
    assert [resolve_port(workload.container, p["targetPort"]) for p in doc["spec"]["ports"]] == [authz]
    policy = one("networkpolicy.yaml", "NetworkPolicy")
    assert selects(policy["spec"]["podSelector"]["matchLabels"], labels)
    assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]} == {authz}


def test_only_the_ingresses_namespaces_reach_keygate() -> None:
    """The NetworkPolicy admits the namespaces the checks come from, the application's among them (Istio sidecars)."""
    policy = one("networkpolicy.yaml", "NetworkPolicy")
    (rule,) = policy["spec"]["ingress"]
    (source,) = rule["from"]
    assert "podSelector" not in source and "ipBlock" not in source
    (expression,) = source["namespaceSelector"]["matchExpressions"]
    assert (expression["key"], expression["operator"]) == ("kubernetes.io/metadata.name", "In")
    asking = {d["metadata"]["namespace"] for d in docs("istio.yaml") if d["kind"] == "AuthorizationPolicy"}
    assert asking | {"ingress-nginx", "istio-system", "traefik", "envoy-gateway-system"} == set(expression["values"])


def test_probes_ask_the_admin_listener_and_drain_fits_the_grace_period(settings: dict[str, Any]) -> None:
    workload = keygate_workload()
    admin = int(settings["admin"]["listen"].rsplit(":", 1)[1])
    assert settings["admin"]["listen"].startswith("0.0.0.0:"), "the kubelet probes the pod IP"
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = workload.container[probe]["httpGet"]
        assert (get["path"], resolve_port(workload.container, get["port"])) == (path, admin)
    authz = int(settings["authz"]["listen"].rsplit(":", 1)[1])
    assert {p["containerPort"] for p in workload.container["ports"]} == {authz, admin}
    sleep, grace = prestop_seconds(workload.container), float(settings["proxy"]["shutdown_grace"])
    assert sleep > 0 and workload.pod["terminationGracePeriodSeconds"] > sleep + grace


def test_keygate_stays_out_of_the_mesh_and_survives_a_drain() -> None:
    """No sidecar (checks would all come from its loopback address); replicas and a PDB, since ingresses fail closed."""
    deployment = keygate_workload().manifest.doc
    assert deployment["spec"]["template"]["metadata"]["labels"]["sidecar.istio.io/inject"] == "false"
    assert deployment["spec"]["replicas"] >= 2
    pdb = one("pdb.yaml", "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert selects(pdb["spec"]["selector"]["matchLabels"], deployment["spec"]["template"]["metadata"]["labels"])


def test_the_migration_job_and_the_secret_are_keygate_s() -> None:
    job = one("migrate-job.yaml", "Job")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["migrate"] and container["image"] == keygate_workload().container["image"]
    secret = one("secret.example.yaml", "Secret")
    assert all("REPLACE_ME" in value for value in secret["stringData"].values())


# -- ingress-nginx ---------------------------------------------------------------
def nginx_annotations() -> dict[str, str]:
    ingress = one("ingress-nginx.yaml", "Ingress")
    prefix = "nginx.ingress.kubernetes.io/"
    return {k[len(prefix):]: v for k, v in ingress["metadata"]["annotations"].items() if k.startswith(prefix)}


def test_ingress_nginx_asks_keygate() -> None:
    url = urlsplit(nginx_annotations()["auth-url"])
    assert url.scheme == "http" and (url.hostname, url.port) == keygate_endpoint()
    # SECURITY: with auth-method the controller sets X-Original-URI itself; without, the client's would reach Keygate.
    assert nginx_annotations()["auth-method"] == "GET"


def test_ingress_nginx_copies_identity_and_keygate_s_authorization() -> None:
    """The identity headers, and Authorization so that the key reaches the app only when Keygate hands it back."""
    headers = [h.strip() for h in nginx_annotations()["auth-response-headers"].split(",")]
    assert all(TOKEN.fullmatch(h) for h in headers), headers
    assert [h.lower() for h in headers] == [*IDENTITY, "authorization"]


def test_ingress_nginx_needs_no_snippet() -> None:
    """Snippet annotations are refused by a default ingress-nginx (annotations-risk-level)."""
    assert not [name for name in nginx_annotations() if name.endswith("snippet")]


def test_ingress_nginx_routes_to_the_app() -> None:
    ingress = one("ingress-nginx.yaml", "Ingress")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    assert (path["path"], path["pathType"]) == ("/", "Prefix")


# -- Traefik -----------------------------------------------------------------------
def test_the_traefik_middleware_is_the_tested_one() -> None:
    """The Middleware's forwardAuth is deploy/ingress/traefik/dynamic.yml's, but for Keygate's address."""
    tested = yaml.safe_load(TRAEFIK_DYNAMIC.read_text())["http"]["middlewares"]["keygate"]["forwardAuth"]
    middleware = one("traefik.yaml", "Middleware")
    forward_auth = dict(middleware["spec"]["forwardAuth"])
    url = urlsplit(forward_auth.pop("address"))
    assert (url.hostname, url.port) == keygate_endpoint()
    tested.pop("address")
    assert forward_auth == tested


def test_the_traefik_ingress_route_uses_the_middleware() -> None:
    middleware = one("traefik.yaml", "Middleware")
    route = one("traefik.yaml", "IngressRoute")
    assert route["metadata"]["namespace"] == middleware["metadata"]["namespace"]
    for rule in route["spec"]["routes"]:
        assert [m["name"] for m in rule["middlewares"]] == [middleware["metadata"]["name"]]
        assert rule["kind"] == "Rule" and rule["services"]


# -- Istio ---------------------------------------------------------------------------
def istio_provider() -> dict[str, Any]:
    operator = one("istio.yaml", "IstioOperator")
    (provider,) = operator["spec"]["meshConfig"]["extensionProviders"]
    return provider  # type: ignore[no-any-return]


def test_istio_asks_keygate_and_fails_closed() -> None:
    http = istio_provider()["envoyExtAuthzHttp"]
    assert (http["service"], http["port"]) == keygate_endpoint()
    assert http["failOpen"] is False and http["statusOnError"] == "503"
    assert "pathPrefix" not in http, "Keygate would judge the prefix as part of the path"


def test_istio_passes_the_headers_the_tested_envoy_config_passes() -> None:
    """Istio writes Envoy's ext_authz for us: the same headers each way as deploy/ingress/envoy/envoy.yaml."""
    http, tested = istio_provider()["envoyExtAuthzHttp"], envoy_authz()
    assert set(http["includeRequestHeadersInCheck"]) == {"authorization", *exact_names(tested["allowed_headers"])}
    response = tested["http_service"]["authorization_response"]
    assert http["headersToUpstreamOnAllow"] == exact_names(response["allowed_upstream_headers"])
    assert http["headersToUpstreamOnAllow"][:5] == IDENTITY
    assert http["headersToDownstreamOnAllow"] == istio_patterns(response["allowed_client_headers_on_success"])
    assert http["headersToDownstreamOnDeny"] == istio_patterns(response["allowed_client_headers"])


def test_the_istio_policy_sends_every_request_to_keygate() -> None:
    policy = one("istio.yaml", "AuthorizationPolicy")
    assert policy["spec"]["action"] == "CUSTOM"
    assert policy["spec"]["provider"]["name"] == istio_provider()["name"]
    assert policy["spec"]["rules"] == [{}], "one empty rule matches every request"
    assert policy["spec"]["selector"]["matchLabels"]


# -- Envoy Gateway -----------------------------------------------------------------
def test_envoy_gateway_asks_keygate_and_fails_closed() -> None:
    policy = one("envoy-gateway.yaml", "SecurityPolicy")
    ext_auth = policy["spec"]["extAuth"]
    assert ext_auth["failOpen"] is False and ext_auth["statusOnError"] == 503
    (backend,) = ext_auth["http"]["backendRefs"]
    host, port = keygate_endpoint()
    assert f"{backend['name']}.{backend['namespace']}.svc.cluster.local" == host and backend["port"] == port
    assert not {"path", "pathOverride"} & set(ext_auth["http"]), "Keygate judges the path it receives"


def test_envoy_gateway_passes_the_headers_the_tested_envoy_config_passes() -> None:
    ext_auth, tested = one("envoy-gateway.yaml", "SecurityPolicy")["spec"]["extAuth"], envoy_authz()
    assert ext_auth["headersToExtAuth"] == ["authorization", *exact_names(tested["allowed_headers"])]
    upstream = exact_names(tested["http_service"]["authorization_response"]["allowed_upstream_headers"])
    assert ext_auth["http"]["headersToBackend"] == upstream


def test_envoy_gateway_may_refer_to_keygate_and_protects_the_route() -> None:
    policy = one("envoy-gateway.yaml", "SecurityPolicy")
    (grant,) = [d for d in docs("envoy-gateway.yaml") if d["kind"] == "ReferenceGrant"]
    (backend,) = policy["spec"]["extAuth"]["http"]["backendRefs"]
    assert grant["metadata"]["namespace"] == backend["namespace"]
    assert {"group": "gateway.envoyproxy.io", "kind": "SecurityPolicy",
            "namespace": policy["metadata"]["namespace"]} in grant["spec"]["from"]
    assert {"group": "", "kind": "Service", "name": backend["name"]} in grant["spec"]["to"]
    (target,) = policy["spec"]["targetRefs"]
    route = one("envoy-gateway.yaml", "HTTPRoute")
    assert (target["group"], target["kind"], target["name"]) == ("gateway.networking.k8s.io", "HTTPRoute",
                                                                 route["metadata"]["name"])
    assert route["metadata"]["namespace"] == policy["metadata"]["namespace"]
