"""Identity exchange: OIDC tokens (GitHub Actions, Kubernetes ...) verified against trust policies.

``jwks`` holds the issuers' signing keys (discovery, JWKS, cache, files).
"""
