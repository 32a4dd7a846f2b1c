"""The decision-only listener: an ingress asks, Keygate answers allow or deny, the ingress forwards."""
