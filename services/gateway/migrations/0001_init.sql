-- The gateway owns accounts, credentials and sessions. Secrets (passwords,
-- enrollment codes, tokens) are stored only as hashes.

CREATE TABLE gateway.accounts (
    id              uuid PRIMARY KEY,
    email           text NOT NULL,
    display_name    text NOT NULL,
    role            text NOT NULL CHECK (role IN ('therapist', 'client')),
    status          text NOT NULL CHECK (status IN ('pending', 'active', 'disabled')),
    password_hash   text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    enrolled_at     timestamptz,
    CHECK (status <> 'active' OR password_hash IS NOT NULL)
);
CREATE UNIQUE INDEX accounts_email_idx ON gateway.accounts (lower(email));

-- One-time codes for therapists created by an operator.
CREATE TABLE gateway.enrollment_codes (
    code_hash    bytea PRIMARY KEY,
    account_id   uuid NOT NULL REFERENCES gateway.accounts (id),
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    used_at      timestamptz
);

CREATE TABLE gateway.sessions (
    id              uuid PRIMARY KEY,
    account_id      uuid NOT NULL REFERENCES gateway.accounts (id),
    created_at      timestamptz NOT NULL DEFAULT now(),
    revoked_at      timestamptz,
    revoked_reason  text
);
CREATE INDEX sessions_account_idx ON gateway.sessions (account_id);

CREATE TABLE gateway.access_tokens (
    token_hash   bytea PRIMARY KEY,
    session_id   uuid NOT NULL REFERENCES gateway.sessions (id),
    expires_at   timestamptz NOT NULL
);
CREATE INDEX access_tokens_session_idx ON gateway.access_tokens (session_id);

-- Refresh tokens rotate: each use marks the old one used and issues a new one.
-- Presenting a used one again means it was stolen: the whole session is revoked.
CREATE TABLE gateway.refresh_tokens (
    token_hash   bytea PRIMARY KEY,
    session_id   uuid NOT NULL REFERENCES gateway.sessions (id),
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    used_at      timestamptz
);
CREATE INDEX refresh_tokens_session_idx ON gateway.refresh_tokens (session_id);
