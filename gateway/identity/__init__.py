"""Identity exchange: OIDC tokens (GitHub Actions, Kubernetes ...) verified against trust policies.

``jwks`` holds the issuers' signing keys (discovery, JWKS, cache, files);
``verify`` decides which trust policy, if any, accepts a token.
"""
