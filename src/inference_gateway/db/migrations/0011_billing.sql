-- The hourly usage reporter: how far it got, what it produced, and how often an hour was
-- corrected. Events are written to the outbox in the same transaction that advances the
-- watermark, so an hour is never reported twice nor skipped; sinks deliver from the outbox.

CREATE SCHEMA IF NOT EXISTS billing;

-- A single row.
--   reported_until: every hour before it has had its regular event (hours go by completed_at);
--   ingested_until: every row ingested (ingested_at) before it has been counted in some event.
-- NULL until the first run, which starts with the last complete hour.
CREATE TABLE billing.watermark (
    id             boolean     PRIMARY KEY DEFAULT true CHECK (id),
    reported_until timestamptz CHECK (reported_until = date_trunc('hour', reported_until, 'UTC')),
    ingested_until timestamptz,
    last_run_at    timestamptz
);
INSERT INTO billing.watermark DEFAULT VALUES;

-- One row per message of at most 1,000 events. With BILLING_SINK=outbox consumers read the rows
-- where delivered_at IS NULL in id order and set delivered_at to acknowledge; with the pgmq and
-- webhook sinks the gateway does that itself after a successful send.
CREATE TABLE billing.outbox (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id   uuid        NOT NULL UNIQUE,
    period_start timestamptz NOT NULL,
    correction   boolean     NOT NULL,
    body         jsonb       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    delivered_at timestamptz,
    attempts     integer     NOT NULL DEFAULT 0,
    last_error   text
);

CREATE INDEX outbox_pending_idx ON billing.outbox (id) WHERE delivered_at IS NULL;

-- The last correction number given to an (instance, model, hour): its events are keyed
-- <instance>-<model>-<YYYYMMDDHH>-r<revision>.
CREATE TABLE billing.corrections (
    instance_id  text        NOT NULL,
    model        text        NOT NULL,
    period_start timestamptz NOT NULL,
    revision     integer     NOT NULL CHECK (revision > 0),
    PRIMARY KEY (instance_id, model, period_start)
);
