-- The controller's state. Times are milliseconds since the Unix epoch.
CREATE TABLE settings (key TEXT PRIMARY KEY, value ANY) STRICT;

CREATE TABLE agents (
    id TEXT PRIMARY KEY,                 -- 32 hex digits, the subject of its certificates
    display_name TEXT NOT NULL,          -- for people; never an identity
    enrolled_ms INTEGER NOT NULL,
    revoked_ms INTEGER,
    online INTEGER NOT NULL DEFAULT 0,
    last_seen_ms INTEGER,
    version TEXT, os TEXT, arch TEXT, hostname TEXT,
    policy_revision INTEGER,
    outbox_epoch BLOB                    -- from the latest hello; event ids count within it
) STRICT;

CREATE TABLE certificates (
    serial TEXT PRIMARY KEY,
    agent TEXT NOT NULL REFERENCES agents(id),
    issued_ms INTEGER NOT NULL,
    not_after_ms INTEGER NOT NULL
) STRICT;
CREATE INDEX certificates_agent ON certificates (agent);

CREATE TABLE tokens (
    hash BLOB PRIMARY KEY,               -- SHA-256 of the secret; the secret is never stored
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    used_ms INTEGER,
    used_by TEXT,
    note TEXT NOT NULL DEFAULT ''
) STRICT;

CREATE TABLE heartbeats (
    agent TEXT NOT NULL REFERENCES agents(id),
    at_ms INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    cpu_permille INTEGER NOT NULL,
    memory_used INTEGER NOT NULL,
    memory_total INTEGER NOT NULL,
    disks TEXT NOT NULL,                 -- JSON: [{role, mount, total, available}]
    next_backup_ms INTEGER,
    outbox INTEGER NOT NULL
) STRICT;
CREATE INDEX heartbeats_agent ON heartbeats (agent, received_ms);

-- Every event id seen, so a redelivered event takes effect once.
CREATE TABLE events (
    agent TEXT NOT NULL,
    epoch BLOB NOT NULL,
    id INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    PRIMARY KEY (agent, epoch, id)
) STRICT, WITHOUT ROWID;

-- Keyed by agent too: job ids come from agents, and one agent must not reach another's.
CREATE TABLE jobs (
    agent TEXT NOT NULL REFERENCES agents(id),
    id TEXT NOT NULL,
    kind TEXT NOT NULL,
    command TEXT,
    state TEXT NOT NULL,                 -- started, running, finished, failed, skipped, cancelled
    started_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    files INTEGER, bytes INTEGER, total_bytes INTEGER,
    new_bytes INTEGER, uploaded_bytes INTEGER, skipped INTEGER, duration_ms INTEGER,
    snapshot TEXT,
    reason TEXT,
    PRIMARY KEY (agent, id)
) STRICT;
CREATE INDEX jobs_started ON jobs (agent, started_ms);

CREATE TABLE job_logs (
    job TEXT NOT NULL,
    agent TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    level TEXT NOT NULL,
    line TEXT NOT NULL
) STRICT;
CREATE INDEX job_logs_job ON job_logs (agent, job, at_ms);

CREATE TABLE snapshots (
    agent TEXT NOT NULL REFERENCES agents(id),
    id TEXT NOT NULL,
    time_ms INTEGER NOT NULL,
    hostname TEXT NOT NULL,
    files INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (agent, id)
) STRICT;

CREATE TABLE policies (
    agent TEXT PRIMARY KEY REFERENCES agents(id),
    revision INTEGER NOT NULL,
    body BLOB NOT NULL,                  -- wire::message::Policy, postcard
    updated_ms INTEGER NOT NULL
) STRICT;

CREATE TABLE commands (
    id TEXT PRIMARY KEY,
    agent TEXT NOT NULL REFERENCES agents(id),
    body BLOB NOT NULL,                  -- wire::message::CommandBody, postcard
    created_ms INTEGER NOT NULL,
    sent_ms INTEGER,
    acked_ms INTEGER,
    accepted INTEGER,
    reason TEXT
) STRICT;
CREATE INDEX commands_pending ON commands (acked_ms, agent);

-- Counters for what the controller dropped: malformed payloads and the like.
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) STRICT;
