"""Service credentials (fake values for the tests)."""


def service_key() -> str:
    """Return the key of the payment service."""
    return "sk_test_FAKE_0000000000"
