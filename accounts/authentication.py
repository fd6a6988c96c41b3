from rest_framework import authentication, exceptions

from . import tokens

REJECTED = {
    "unknown": "Invalid token.",
    "revoked": "Token revoked.",
    "expired": "Token expired.",
    "inactive": "User inactive.",
}


class BearerTokenAuthentication(authentication.BaseAuthentication):
    """`Authorization: Bearer <token>`: looks the token up by its hash; expired and revoked tokens fail."""

    keyword = "Bearer"

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).decode("latin-1")
        if not header:
            return None
        parts = header.split()
        # The scheme is case-insensitive (RFC 9110); a blank header or another scheme is not ours.
        if not parts or parts[0].lower() != self.keyword.lower():
            return None
        if len(parts) != 2:
            raise exceptions.AuthenticationFailed("Authorization header must be 'Bearer <token>'.")
        try:
            token = tokens.check(parts[1])
        except tokens.TokenRejected as exc:
            raise exceptions.AuthenticationFailed(REJECTED[exc.reason]) from None
        return token.user, token

    def authenticate_header(self, request):
        return self.keyword
