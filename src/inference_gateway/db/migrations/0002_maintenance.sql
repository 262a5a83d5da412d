-- Partition maintenance for every pg_partman partition set in this database, inference.requests
-- first among them:
--
--   inference.optimized_run_maintenance(parent)     pg_partman's run_maintenance, measured and locked
--   inference.parallel_run_maintenance(schemas, n)  the per-set steps on n connections at once
--   public.log_maintenance_performance(...)          one row per run in inference.maintenance_log
--   inference.maintenance_performance_analysis       per function and day
--   inference.configure_maintenance(...)             retention, threshold, schedule from settings
--
-- Works on pg_partman 4.x and 5.x. pg_cron and dblink are used where they are installed; without
-- them this migration still applies (with a notice) and maintenance runs from the gateway.
--
-- Lock keys (transaction-level advisory locks, all taken with try-lock so nobody ever waits):
--   hashtext('inference_gateway partition maintenance')  one of our runs at a time
--   hashtext('pg_partman run_maintenance')              pg_partman's own key: our runs take it
--       exclusively like run_maintenance does; parallel workers take it shared, so they run
--       together but never alongside a run_maintenance started elsewhere
--   hashtext('pg_partman drop_partition_time')          pg_partman's retention key

-- dblink gives the parallel runs their extra connections, records failures in a transaction of
-- their own, and reaches pg_cron when it lives in another database.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'dblink') THEN
        IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'dblink') THEN
            BEGIN
                CREATE EXTENSION dblink;
            EXCEPTION WHEN insufficient_privilege THEN
                RAISE NOTICE 'dblink is available but this role may not install it: '
                    'parallel_run_maintenance will run the partition sets one after another';
            END;
        ELSE
            RAISE NOTICE 'dblink is not installed on this server: '
                'parallel_run_maintenance will run the partition sets one after another';
        END IF;
    END IF;
END
$$;

-- Settings the maintenance functions read; inference.configure_maintenance() writes them from the
-- gateway's settings after every migration.
CREATE TABLE inference.maintenance_settings (
    singleton            boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    warn_after_sec       numeric     NOT NULL DEFAULT 300 CHECK (warn_after_sec > 0),
    maintenance_work_mem text        NOT NULL DEFAULT '256MB'
                                     CHECK (pg_size_bytes(maintenance_work_mem) >= 1024 * 1024),
    schedule             text        NOT NULL DEFAULT '0 2 * * *',
    -- libpq keywords for the connections maintenance opens to this server (parallel workers,
    -- failure records, the pg_cron database), e.g. 'host=10.0.0.5 user=maint password=...'.
    -- NULL: this server's socket directory (or localhost), its port, the current user.
    dblink_conninfo      text,
    scheduler            text        NOT NULL DEFAULT 'unknown',  -- 'pg_cron' or 'gateway'
    scheduler_detail     text,
    updated_at           timestamptz NOT NULL DEFAULT now()
);
INSERT INTO inference.maintenance_settings DEFAULT VALUES;

CREATE TABLE inference.maintenance_log (
    id                 bigserial   PRIMARY KEY,
    function_name      text        NOT NULL,
    parent_table       text,       -- NULL: every partition set with automatic maintenance
    started_at         timestamptz NOT NULL,
    finished_at        timestamptz NOT NULL,
    duration_sec       numeric     GENERATED ALWAYS AS
                                   (extract(epoch FROM finished_at - started_at)) STORED,
    partitions_created integer     NOT NULL DEFAULT 0,
    partitions_dropped integer     NOT NULL DEFAULT 0,  -- dropped or detached by retention
    rows_moved         bigint      NOT NULL DEFAULT 0,  -- out of the default partition
    default_rows       bigint,                          -- left in the default partition
    status             text        NOT NULL
                                   CHECK (status IN ('done', 'partial', 'skipped', 'failed')),
    steps              jsonb       NOT NULL DEFAULT '{}',
    detail             text,
    logged_at          timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX maintenance_log_started_idx ON inference.maintenance_log (started_at);

CREATE TYPE inference.maintenance_result AS (
    parent_table       text,
    status             text,
    partitions_created integer,
    partitions_dropped integer,
    rows_moved         bigint,
    default_rows       bigint,
    seconds            numeric,
    log_id             bigint,
    detail             text
);

-- Executions that did their work ('done' or 'partial') per function and day (UTC); skipped and
-- failed runs are counted apart and left out of the timings.
CREATE VIEW inference.maintenance_performance_analysis AS
SELECT function_name,
       (started_at AT TIME ZONE 'UTC')::date                               AS day,
       count(*) FILTER (WHERE status IN ('done', 'partial'))               AS executions,
       round(avg(duration_sec) FILTER (WHERE status IN ('done', 'partial')), 3) AS avg_seconds,
       round(max(duration_sec) FILTER (WHERE status IN ('done', 'partial')), 3) AS max_seconds,
       round(min(duration_sec) FILTER (WHERE status IN ('done', 'partial')), 3) AS min_seconds,
       coalesce(sum(partitions_created), 0)                                AS partitions_created,
       coalesce(sum(partitions_dropped), 0)                                AS partitions_dropped,
       coalesce(sum(rows_moved), 0)                                        AS rows_moved,
       count(*) FILTER (WHERE status = 'partial')                          AS partial,
       count(*) FILTER (WHERE status = 'skipped')                          AS skipped,
       count(*) FILTER (WHERE status = 'failed')                           AS failed
  FROM inference.maintenance_log
 GROUP BY function_name, (started_at AT TIME ZONE 'UTC')::date;

------------------------------------------------------------------------------------------------
-- Small helpers
------------------------------------------------------------------------------------------------

CREATE FUNCTION inference._extension_schema(p_extension text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT n.nspname::text
      FROM pg_catalog.pg_extension e
      JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
     WHERE e.extname = p_extension
$$;

CREATE FUNCTION inference._partman_major() RETURNS integer
LANGUAGE sql STABLE AS $$
    SELECT split_part(extversion, '.', 1)::integer
      FROM pg_catalog.pg_extension WHERE extname = 'pg_partman'
$$;

-- The oid of a parent named the way pg_partman names it (schema.table, unquoted).
CREATE FUNCTION inference._parent_oid(p_parent_table text) RETURNS oid
LANGUAGE sql STABLE AS $$
    SELECT c.oid
      FROM pg_catalog.pg_class c
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = split_part(p_parent_table, '.', 1)
       AND c.relname = split_part(p_parent_table, '.', 2)
$$;

-- The default partition of a set, from pg_partitioned_table: catalog only, no lock taken.
CREATE FUNCTION inference._default_partition(p_parent_table text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT format('%I.%I', n.nspname, c.relname)
      FROM pg_catalog.pg_partitioned_table p
      JOIN pg_catalog.pg_class c ON c.oid = p.partdefid
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE p.partrelid = inference._parent_oid(p_parent_table)
$$;

-- The partitions of a set, without the default: catalog only, so it takes no lock on the tables.
CREATE FUNCTION inference._children(p_parent_table text)
RETURNS TABLE (child oid, relname name, qualified text)
LANGUAGE sql STABLE AS $$
    SELECT c.oid, c.relname, format('%I.%I', n.nspname, c.relname)
      FROM pg_catalog.pg_inherits i
      JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE i.inhparent = inference._parent_oid(p_parent_table)
       AND i.inhrelid <> coalesce((SELECT partdefid FROM pg_catalog.pg_partitioned_table
                                    WHERE partrelid = i.inhparent), 0)
$$;

-- The same, as one array of quoted, schema-qualified names.
CREATE FUNCTION inference._partitions(p_parent_table text) RETURNS text[]
LANGUAGE sql STABLE AS $$
    SELECT coalesce(array_agg(qualified ORDER BY relname), '{}'::text[])
      FROM inference._children(p_parent_table)
$$;

-- The control column of a set and how it holds time ('none', or the unit of an epoch column).
CREATE FUNCTION inference._control_of(p_parent_table text, OUT control text, OUT epoch text)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    EXECUTE format('SELECT control, epoch FROM %I.part_config WHERE parent_table = $1',
                   inference._extension_schema('pg_partman'))
       INTO control, epoch USING p_parent_table;
END
$$;

-- Where each partition of a time-based set starts. pg_get_expr() opens (and locks, briefly) the
-- relation it is given, so it is called on this set's partitions one by one: pg_partman's own
-- lookups call it on every partition of the database, which waits for (and, inside a transaction
-- that attached a partition, deadlocks with) any other set's ATTACH PARTITION.
CREATE FUNCTION inference._partition_starts(p_parent_table text)
RETURNS TABLE (partition_name text, start_at timestamptz)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_factor  numeric;
    v_child   record;
    v_raw     text;
BEGIN
    v_factor := CASE (inference._control_of(p_parent_table)).epoch
                    WHEN 'seconds' THEN 1 WHEN 'milliseconds' THEN 1000
                    WHEN 'microseconds' THEN 1000000 WHEN 'nanoseconds' THEN 1000000000
                END;
    FOR v_child IN SELECT child, qualified FROM inference._children(p_parent_table) LOOP
        v_raw := btrim((regexp_match(
                     pg_catalog.pg_get_expr((SELECT relpartbound FROM pg_catalog.pg_class
                                              WHERE oid = v_child.child), v_child.child),
                     'FROM \(([^)]*)\) TO'))[1], '''');
        CONTINUE WHEN v_raw IS NULL OR v_raw IN ('MINVALUE', 'MAXVALUE');
        partition_name := v_child.qualified;
        start_at := CASE WHEN v_factor IS NULL THEN v_raw::timestamptz
                         ELSE to_timestamp(v_raw::numeric / v_factor) END;
        RETURN NEXT;
    END LOOP;
END
$$;

-- The control column as a time expression (epoch columns converted), for dynamic SQL.
CREATE FUNCTION inference._control_expression(p_parent_table text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE epoch
        WHEN 'seconds' THEN format('to_timestamp(%I)', control)
        WHEN 'milliseconds' THEN format('to_timestamp(%I / 1000.0)', control)
        WHEN 'microseconds' THEN format('to_timestamp(%I / 1000000.0)', control)
        WHEN 'nanoseconds' THEN format('to_timestamp(%I / 1000000000.0)', control)
        ELSE format('%I', control) END
      FROM inference._control_of(p_parent_table)
$$;

-- The start of the partition that holds p_at, on the grid of the set's existing partitions.
CREATE FUNCTION inference._grid_start(p_parent_table text, p_at timestamptz) RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_partman  text := inference._extension_schema('pg_partman');
    v_interval interval;
    v_start    timestamptz;
    v_steps    integer := 0;
BEGIN
    EXECUTE format('SELECT partition_interval::interval FROM %I.part_config '
                   'WHERE parent_table = $1', v_partman)
       INTO v_interval USING p_parent_table;
    -- Walk from the nearest partition that exists.
    SELECT coalesce(max(start_at) FILTER (WHERE start_at <= p_at), min(start_at))
      INTO v_start FROM inference._partition_starts(p_parent_table);
    IF v_start IS NULL THEN
        RAISE EXCEPTION 'partition set % has no partition to align new ones with',
            p_parent_table;
    END IF;
    WHILE v_start > p_at AND v_steps < 100000 LOOP
        v_start := v_start - v_interval;
        v_steps := v_steps + 1;
    END LOOP;
    WHILE v_start + v_interval <= p_at AND v_steps < 100000 LOOP
        v_start := v_start + v_interval;
        v_steps := v_steps + 1;
    END LOOP;
    IF NOT (v_start <= p_at AND p_at < v_start + v_interval) THEN
        RAISE EXCEPTION 'no partition of % can hold %', p_parent_table, p_at;
    END IF;
    RETURN v_start;
END
$$;

-- pg_partman's create_partition_time for one start time (no ANALYZE on 4.x); true if created.
CREATE FUNCTION inference._create_partition(p_parent_table text, p_start timestamptz)
RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_partman text := inference._extension_schema('pg_partman');
    v_made    boolean;
BEGIN
    IF inference._partman_major() >= 5 THEN
        EXECUTE format('SELECT %I.create_partition_time($1, $2)', v_partman)
           INTO v_made USING p_parent_table, ARRAY[p_start];
    ELSE
        EXECUTE format('SELECT %I.create_partition_time($1, $2, p_analyze => false)', v_partman)
           INTO v_made USING p_parent_table, ARRAY[p_start];
    END IF;
    RETURN coalesce(v_made, false);
END
$$;

CREATE FUNCTION inference._default_rows(p_parent_table text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_default text := inference._default_partition(p_parent_table);
    v_rows    bigint;
BEGIN
    IF v_default IS NULL THEN
        RETURN 0;
    END IF;
    EXECUTE format('SELECT count(*) FROM ONLY %s', v_default) INTO v_rows;
    RETURN v_rows;
END
$$;

-- Elements of a that are not in b.
CREATE FUNCTION inference._array_minus(a text[], b text[]) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$
    SELECT count(*)::integer FROM (SELECT unnest(a) EXCEPT SELECT unnest(b)) AS d
$$;

-- True for sets partitioned by time (a time column, or an integer column holding epoch times).
CREATE FUNCTION inference._is_time_set(p_parent_table text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT coalesce(epoch, 'none') <> 'none' OR EXISTS (
               SELECT 1 FROM pg_catalog.pg_attribute a
                WHERE a.attrelid = inference._parent_oid(p_parent_table)
                  AND a.attname = control
                  AND a.atttypid IN ('timestamptz'::regtype, 'timestamp'::regtype,
                                     'date'::regtype))
      FROM inference._control_of(p_parent_table)
$$;

-- SET LOCAL maintenance_work_mem to the configured value, never lowering it.
CREATE FUNCTION inference._raise_work_mem() RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_wanted text;
BEGIN
    SELECT maintenance_work_mem INTO v_wanted FROM inference.maintenance_settings;
    IF v_wanted IS NOT NULL
       AND pg_size_bytes(v_wanted) > pg_size_bytes(current_setting('maintenance_work_mem')) THEN
        PERFORM set_config('maintenance_work_mem', v_wanted, true);
    END IF;
END
$$;

-- libpq connection string to a database of this server, for dblink.
CREATE FUNCTION inference._conninfo(p_dbname text) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_extra  text;
    v_socket text := btrim(split_part(current_setting('unix_socket_directories'), ',', 1));
    v_quote  text := $q$'$q$;
BEGIN
    SELECT dblink_conninfo INTO v_extra FROM inference.maintenance_settings;
    RETURN format('host=%s port=%s user=%s %s dbname=%s',
                  v_quote || replace(replace(coalesce(nullif(v_socket, ''), 'localhost'),
                                     '\', '\\'), v_quote, '\' || v_quote) || v_quote,
                  current_setting('port'),
                  v_quote || replace(replace(current_user, '\', '\\'), v_quote, '\' || v_quote)
                      || v_quote,
                  coalesce(v_extra, ''),
                  v_quote || replace(replace(p_dbname, '\', '\\'), v_quote, '\' || v_quote)
                      || v_quote);
END
$$;

------------------------------------------------------------------------------------------------
-- Logging
------------------------------------------------------------------------------------------------

CREATE FUNCTION public.log_maintenance_performance(
    p_function_name      text,
    p_parent_table       text,
    p_started_at         timestamptz,
    p_finished_at        timestamptz DEFAULT clock_timestamp(),
    p_partitions_created integer     DEFAULT 0,
    p_partitions_dropped integer     DEFAULT 0,
    p_rows_moved         bigint      DEFAULT 0,
    p_default_rows       bigint      DEFAULT NULL,
    p_status             text        DEFAULT 'done',
    p_steps              jsonb       DEFAULT '{}',
    p_detail             text        DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_id        bigint;
    v_seconds   numeric;
    v_threshold numeric;
BEGIN
    INSERT INTO inference.maintenance_log
           (function_name, parent_table, started_at, finished_at, partitions_created,
            partitions_dropped, rows_moved, default_rows, status, steps, detail)
    VALUES (p_function_name, p_parent_table, p_started_at, coalesce(p_finished_at, clock_timestamp()),
            coalesce(p_partitions_created, 0), coalesce(p_partitions_dropped, 0),
            coalesce(p_rows_moved, 0), p_default_rows, coalesce(p_status, 'done'),
            coalesce(p_steps, '{}'), p_detail)
    RETURNING id, duration_sec INTO v_id, v_seconds;

    SELECT warn_after_sec INTO v_threshold FROM inference.maintenance_settings;
    IF v_seconds > coalesce(v_threshold, 300) THEN
        RAISE WARNING '% of % took % s, more than the % s threshold',
            p_function_name, coalesce(p_parent_table, 'every partition set'),
            round(v_seconds, 1), v_threshold
            USING HINT = 'See inference.maintenance_performance_analysis; the threshold is '
                         'MAINTENANCE_WARN_AFTER_SEC.';
    END IF;
    RETURN v_id;
END
$$;

-- Record a failure in a transaction of its own (the failing one is about to roll back).
CREATE FUNCTION inference._log_failure(
    p_function_name text, p_parent_table text, p_started_at timestamptz, p_detail text,
    p_steps jsonb DEFAULT '{}'
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_dblink text := inference._extension_schema('dblink');
    v_id     bigint;
BEGIN
    IF v_dblink IS NULL THEN
        RAISE WARNING 'the failure of % is not recorded in inference.maintenance_log: '
                      'dblink is not installed', p_function_name;
        RETURN NULL;
    END IF;
    EXECUTE format('SELECT id FROM %I.dblink($1, $2) AS t(id bigint)', v_dblink)
       INTO v_id
      USING inference._conninfo(current_database()),
            format('SELECT public.log_maintenance_performance(%L, %L, %L::timestamptz, '
                   'clock_timestamp(), 0, 0, 0, NULL, ''failed'', %L::jsonb, %L)',
                   p_function_name, p_parent_table, to_json(p_started_at) #>> '{}',
                   coalesce(p_steps, '{}')::text, p_detail);
    RETURN v_id;
EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'could not record the failure of %: %', p_function_name, SQLERRM;
    RETURN NULL;
END
$$;

------------------------------------------------------------------------------------------------
-- The per-set steps
------------------------------------------------------------------------------------------------

-- Move the rows of one partition interval out of the default partition of a time-based set:
-- the oldest such rows go to a temporary table, pg_partman's create_partition_time makes their
-- partition, and they are inserted back through the parent. These are the steps of pg_partman's
-- partition_data_time, which is not used here because its lookup of the default partition locks
-- every partition in the database in turn (see _partition_starts). Returns the rows moved, 0 when
-- the default partition holds no (finite) time any more.
CREATE FUNCTION inference._move_default_batch(p_parent_table text) RETURNS bigint
LANGUAGE plpgsql
SET client_min_messages = warning  -- "temporary table already exists", once per batch
AS $$
DECLARE
    v_partman   text := inference._extension_schema('pg_partman');
    v_default   text := inference._default_partition(p_parent_table);
    v_expr      text := inference._control_expression(p_parent_table);
    v_parent    oid  := inference._parent_oid(p_parent_table);
    v_interval  interval;
    v_datetime  text;
    v_min       timestamptz;
    v_start     timestamptz;
    v_end       timestamptz;
    v_temp      text := 'inference_moving_' || left(md5(p_parent_table), 16);
    v_columns   text;
    v_target    text;
    v_rows      bigint;
BEGIN
    IF v_default IS NULL THEN
        RETURN 0;
    END IF;
    EXECUTE format('SELECT partition_interval::interval, datetime_string FROM %I.part_config '
                   'WHERE parent_table = $1', v_partman)
       INTO v_interval, v_datetime USING p_parent_table;
    -- Rows at +-infinity have no partition; they stay (and are counted) in the default.
    EXECUTE format('SELECT min(%1$s::timestamptz) FILTER (WHERE isfinite(%1$s::timestamptz)) '
                   'FROM ONLY %2$s', v_expr, v_default)
       INTO v_min;
    IF v_min IS NULL THEN
        RETURN 0;
    END IF;
    v_start := inference._grid_start(p_parent_table, v_min);
    v_end := v_start + v_interval;

    EXECUTE format('CREATE TEMP TABLE IF NOT EXISTS %I (LIKE %s) ON COMMIT DROP',
                   v_temp, v_default);
    EXECUTE format('WITH moved AS (DELETE FROM ONLY %s WHERE %s >= $1 AND %2$s < $2 RETURNING *) '
                   'INSERT INTO %I SELECT * FROM moved', v_default, v_expr, v_temp)
      USING v_start, v_end;
    GET DIAGNOSTICS v_rows = ROW_COUNT;

    PERFORM inference._create_partition(p_parent_table, v_start);
    IF EXISTS (SELECT 1 FROM inference._partition_starts(p_parent_table) WHERE start_at = v_start)
    THEN
        v_target := format('%I.%I', split_part(p_parent_table, '.', 1),
                           split_part(p_parent_table, '.', 2));
    ELSE
        -- The partition's name is taken by a table outside the set: with retention_keep_table,
        -- the detached partition of that interval. The rows join it, as pg_partman would do.
        EXECUTE format('SELECT format(''%%I.%%I'', $1, %I.check_name_length($2, $3, true))',
                       v_partman)
           INTO v_target
          USING split_part(p_parent_table, '.', 1), split_part(p_parent_table, '.', 2),
                to_char(v_start, v_datetime);
        IF to_regclass(v_target) IS NULL THEN
            RAISE EXCEPTION 'could not create the partition of % for %', p_parent_table, v_start;
        END IF;
    END IF;

    -- Generated columns are computed again; identity values are kept.
    SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum)
      INTO v_columns
      FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = v_parent AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '';
    EXECUTE format('INSERT INTO %s (%s) OVERRIDING SYSTEM VALUE SELECT %2$s FROM %I',
                   v_target, v_columns, v_temp);
    EXECUTE format('TRUNCATE %I', v_temp);
    RETURN v_rows;
END
$$;

-- Move every row of the default partition into proper partitions (creating them). Sets
-- partitioned by id use pg_partman's partition_data_id.
CREATE FUNCTION inference._move_default_rows(p_parent_table text) RETURNS bigint
LANGUAGE plpgsql
SET client_min_messages = warning
AS $$
DECLARE
    v_partman text := inference._extension_schema('pg_partman');
    v_moved   bigint;
    v_total   bigint := 0;
BEGIN
    IF inference._default_partition(p_parent_table) IS NULL THEN
        RETURN 0;
    END IF;
    LOOP
        IF inference._is_time_set(p_parent_table) THEN
            v_moved := inference._move_default_batch(p_parent_table);
        ELSE
            EXECUTE format('SELECT %I.partition_data_id(p_parent_table => $1, '
                           'p_batch_count => 100, p_analyze => false)', v_partman)
               INTO v_moved USING p_parent_table;
        END IF;
        EXIT WHEN coalesce(v_moved, 0) <= 0;
        v_total := v_total + v_moved;
    END LOOP;
    RETURN v_total;
END
$$;

-- Make sure the partition holding "now" and the `premake` partitions after it exist, even where
-- later partitions exist already: pg_partman's own premaking counts from the last partition, so
-- one row far in the future stops it for months. Sets with infinite_time_partitions off keep
-- pg_partman's rule: premake after the newest row, only beyond the last partition.
CREATE FUNCTION inference._premake(p_parent_table text) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_partman  text := inference._extension_schema('pg_partman');
    v_expr     text;
    v_interval interval;
    v_premake  integer;
    v_infinite boolean;
    v_last     timestamptz;
    v_child    record;
    v_ref      timestamptz;
    v_start    timestamptz;
    v_created  integer := 0;
BEGIN
    IF NOT inference._is_time_set(p_parent_table) THEN
        RETURN 0;
    END IF;
    EXECUTE format('SELECT partition_interval::interval, premake, infinite_time_partitions '
                   'FROM %I.part_config WHERE parent_table = $1', v_partman)
       INTO v_interval, v_premake, v_infinite USING p_parent_table;
    SELECT max(start_at) INTO v_last FROM inference._partition_starts(p_parent_table);
    IF v_last IS NULL THEN
        RETURN 0;
    END IF;

    IF v_infinite THEN
        v_ref := CURRENT_TIMESTAMP;
    ELSE
        -- Like pg_partman: the newest value, found in the newest partition that has rows.
        v_expr := inference._control_expression(p_parent_table);
        FOR v_child IN SELECT partition_name FROM inference._partition_starts(p_parent_table)
                        ORDER BY start_at DESC
        LOOP
            EXECUTE format('SELECT max(%s) FROM %s', v_expr, v_child.partition_name) INTO v_ref;
            EXIT WHEN v_ref IS NOT NULL;
        END LOOP;
        IF v_ref IS NULL THEN
            RETURN 0;  -- an empty set with infinite_time_partitions off: nothing to go by
        END IF;
    END IF;

    v_start := inference._grid_start(p_parent_table, v_ref);
    FOR i IN 0..greatest(v_premake, 0) LOOP
        IF v_infinite OR v_start > v_last THEN
            IF inference._create_partition(p_parent_table, v_start) THEN
                v_created := v_created + 1;
            END IF;
        END IF;
        v_start := v_start + v_interval;
    END LOOP;
    RETURN v_created;
END
$$;

-- The parent tables selected by schema names: pg_partman's own schema means all its partition
-- sets with automatic maintenance on; any other schema means the sets whose parent is there.
CREATE FUNCTION inference._select_partition_sets(p_schemas text[]) RETURNS text[]
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_partman text := inference._extension_schema('pg_partman');
    v_schema  text;
    v_found   text[];
    v_sets    text[] := '{}';
BEGIN
    FOREACH v_schema IN ARRAY coalesce(p_schemas, ARRAY[v_partman]) LOOP
        IF v_schema IS NULL OR v_schema = '' THEN
            CONTINUE;
        END IF;
        IF v_schema = v_partman THEN
            EXECUTE format('SELECT coalesce(array_agg(parent_table ORDER BY parent_table), ''{}'') '
                           'FROM %I.part_config WHERE automatic_maintenance = ''on'' '
                           'AND NOT undo_in_progress', v_partman)
               INTO v_found;
        ELSIF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = v_schema) THEN
            RAISE NOTICE 'schema % does not exist: no partition set to maintain there', v_schema;
            CONTINUE;
        ELSE
            EXECUTE format('SELECT coalesce(array_agg(parent_table ORDER BY parent_table), ''{}'') '
                           'FROM %I.part_config WHERE split_part(parent_table, ''.'', 1) = $1 '
                           'AND NOT undo_in_progress', v_partman)
               INTO v_found USING v_schema;
        END IF;
        IF cardinality(v_found) = 0 THEN
            RAISE NOTICE 'schema % holds no partition set', v_schema;
        END IF;
        v_sets := v_sets || ARRAY(SELECT s FROM unnest(v_found) AS s WHERE s <> ALL (v_sets));
    END LOOP;
    RETURN v_sets;
END
$$;

-- Step 1 of a parallel run, on a connection of its own: move the default partition's rows and
-- premake, for one time-based set (sets partitioned by id are left to step 2). No global lock: a
-- shared hold on pg_partman's run_maintenance key keeps out a run_maintenance() started
-- elsewhere (and this step out while one runs). With p_commit (a top-level CALL) each batch is
-- its own transaction, so the default partition is locked one interval at a time.
CREATE PROCEDURE inference._maintain_set_concurrently(
    p_parent_table          text,
    p_commit                boolean,
    INOUT status            text    DEFAULT NULL,
    INOUT started_at        text    DEFAULT NULL,
    INOUT finished_at       text    DEFAULT NULL,
    INOUT partitions_before text[]  DEFAULT NULL,
    INOUT rows_moved        bigint  DEFAULT NULL,
    INOUT steps             jsonb   DEFAULT NULL,
    INOUT detail            text    DEFAULT NULL
)
LANGUAGE plpgsql AS $$
DECLARE
    v_started timestamptz := clock_timestamp();
    v_moved   bigint;
    v_locked  boolean;
BEGIN
    partitions_before := inference._partitions(p_parent_table);
    rows_moved := 0;
    IF NOT inference._is_time_set(p_parent_table) THEN
        status := 'done';
        steps := jsonb_build_object('move_default', 'serial', 'premake', 'serial');
    ELSE
        steps := '{}';
        LOOP
            v_locked := pg_try_advisory_xact_lock_shared(hashtext('pg_partman run_maintenance'));
            EXIT WHEN NOT v_locked;
            PERFORM inference._raise_work_mem();
            v_moved := inference._move_default_batch(p_parent_table);
            EXIT WHEN v_moved = 0;
            rows_moved := rows_moved + v_moved;
            IF p_commit THEN
                COMMIT;
            END IF;
        END LOOP;
        IF v_locked THEN
            steps := steps || '{"move_default": "done"}';
            PERFORM inference._premake(p_parent_table);
            steps := steps || '{"premake": "done"}';
            status := 'done';
        ELSE
            steps := steps || jsonb_build_object(
                'move_default', CASE WHEN rows_moved > 0 THEN 'partial' ELSE 'skipped' END,
                'premake', 'skipped');
            status := 'skipped';
            detail := 'pg_partman run_maintenance is running in another session';
        END IF;
    END IF;
    started_at := to_json(v_started) #>> '{}';
    finished_at := to_json(clock_timestamp()) #>> '{}';
    steps := steps || jsonb_build_object('concurrent_started_at', started_at,
                                         'concurrent_finished_at', finished_at);
    IF p_commit THEN
        COMMIT;
    END IF;
END
$$;

-- Step 2 of a parallel run, one set after another: retention (and, for sets partitioned by id,
-- the whole of pg_partman's run_maintenance), then the log row.
CREATE FUNCTION inference._finish_partition_set(
    p_parent_table text, p_function_name text, p_started_at timestamptz,
    p_partitions_before text[], p_rows_moved bigint, p_status text, p_steps jsonb, p_detail text
) RETURNS inference.maintenance_result
LANGUAGE plpgsql AS $$
DECLARE
    v_partman  text := inference._extension_schema('pg_partman');
    v_steps    jsonb := coalesce(p_steps, '{}');
    v_status   text := p_status;
    v_detail   text := p_detail;
    v_moved    bigint := coalesce(p_rows_moved, 0);
    v_retained boolean;
    v_after    text[];
    v_result   inference.maintenance_result;
    v_finished timestamptz;
BEGIN
    IF v_status <> 'failed' THEN
        PERFORM inference._raise_work_mem();
        IF inference._is_time_set(p_parent_table) THEN
            EXECUTE format('SELECT retention IS NOT NULL FROM %I.part_config '
                           'WHERE parent_table = $1', v_partman)
               INTO v_retained USING p_parent_table;
            IF NOT v_retained THEN
                v_steps := v_steps || '{"retention": "not configured"}';
            ELSIF pg_try_advisory_xact_lock(hashtext('pg_partman drop_partition_time')) THEN
                EXECUTE format('SELECT %I.drop_partition_time($1)', v_partman) USING p_parent_table;
                v_steps := v_steps || '{"retention": "done"}';
            ELSE
                v_steps := v_steps || '{"retention": "skipped"}';
                v_detail := concat_ws('; ', v_detail,
                    'retention skipped: drop_partition_time is running in another session');
            END IF;
        ELSIF pg_try_advisory_xact_lock(hashtext('pg_partman run_maintenance'))
              AND pg_try_advisory_xact_lock(hashtext('pg_partman drop_partition_time')) THEN
            -- Sets partitioned by id: pg_partman does retention and premaking.
            v_moved := v_moved + inference._move_default_rows(p_parent_table);
            EXECUTE format('SELECT %I.run_maintenance(p_parent_table => $1)', v_partman)
              USING p_parent_table;
            v_steps := v_steps || '{"move_default": "done", "premake": "done", '
                                  '"run_maintenance": "done"}';
        ELSE
            v_steps := v_steps || '{"move_default": "skipped", "premake": "skipped", '
                                  '"run_maintenance": "skipped"}';
            v_detail := concat_ws('; ', v_detail,
                'run_maintenance skipped: pg_partman maintenance is running in another session');
        END IF;
        SELECT CASE WHEN count(*) FILTER (WHERE value IN ('"skipped"', '"partial"')) = 0
                    THEN 'done'
                    WHEN count(*) FILTER (WHERE value IN ('"done"', '"partial"')) = 0
                    THEN 'skipped'
                    ELSE 'partial' END
          INTO v_status
          FROM jsonb_each(v_steps);
    END IF;

    v_after := inference._partitions(p_parent_table);
    v_finished := clock_timestamp();
    v_result.parent_table := p_parent_table;
    v_result.status := v_status;
    v_result.partitions_created := inference._array_minus(v_after, p_partitions_before);
    v_result.partitions_dropped := inference._array_minus(p_partitions_before, v_after);
    v_result.rows_moved := v_moved;
    v_result.default_rows := inference._default_rows(p_parent_table);
    v_result.seconds := round(extract(epoch FROM v_finished - p_started_at), 3);
    v_result.detail := v_detail;
    v_result.log_id := public.log_maintenance_performance(
        p_function_name, p_parent_table, p_started_at, v_finished,
        v_result.partitions_created, v_result.partitions_dropped, v_result.rows_moved,
        v_result.default_rows, v_status, v_steps, v_detail);
    RETURN v_result;
END
$$;

------------------------------------------------------------------------------------------------
-- optimized_run_maintenance
------------------------------------------------------------------------------------------------

CREATE FUNCTION inference.optimized_run_maintenance(p_parent_table text DEFAULT NULL)
RETURNS inference.maintenance_result
LANGUAGE plpgsql AS $$
DECLARE
    v_started  timestamptz := clock_timestamp();
    v_partman  text := inference._extension_schema('pg_partman');
    v_sets     text[];
    v_set      text;
    v_before   text[] := '{}';
    v_after    text[] := '{}';
    v_moved    bigint := 0;
    v_left     bigint := 0;
    v_result   inference.maintenance_result;
    v_message  text;
    v_context  text;
BEGIN
    v_result.parent_table := p_parent_table;
    IF NOT pg_try_advisory_xact_lock(hashtext('inference_gateway partition maintenance')) THEN
        v_message := 'partition maintenance is already running in another session';
    ELSIF NOT pg_try_advisory_xact_lock(hashtext('pg_partman run_maintenance'))
          OR NOT pg_try_advisory_xact_lock(hashtext('pg_partman drop_partition_time')) THEN
        v_message := 'pg_partman maintenance is running in another session';
    END IF;
    IF v_message IS NOT NULL THEN
        RAISE NOTICE 'optimized_run_maintenance skipped: %', v_message;
        v_result.status := 'skipped';
        v_result.partitions_created := 0;
        v_result.partitions_dropped := 0;
        v_result.rows_moved := 0;
        v_result.detail := v_message;
        v_result.seconds := round(extract(epoch FROM clock_timestamp() - v_started), 3);
        v_result.log_id := public.log_maintenance_performance(
            'optimized_run_maintenance', p_parent_table, v_started, clock_timestamp(),
            0, 0, 0, NULL, 'skipped', '{"run_maintenance": "skipped"}', v_message);
        RETURN v_result;
    END IF;

    PERFORM inference._raise_work_mem();
    IF p_parent_table IS NULL THEN
        EXECUTE format('SELECT coalesce(array_agg(parent_table ORDER BY parent_table), ''{}'') '
                       'FROM %I.part_config WHERE automatic_maintenance = ''on'' '
                       'AND NOT undo_in_progress', v_partman)
           INTO v_sets;
    ELSE
        EXECUTE format('SELECT array_agg(parent_table) FROM %I.part_config '
                       'WHERE parent_table = $1', v_partman)
           INTO v_sets USING p_parent_table;
        IF v_sets IS NULL THEN
            RAISE EXCEPTION 'no pg_partman partition set is named %', p_parent_table
                USING HINT = format('See %I.part_config.parent_table.', v_partman);
        END IF;
    END IF;

    BEGIN
        FOREACH v_set IN ARRAY v_sets LOOP
            v_before := v_before || inference._partitions(v_set);
            v_moved := v_moved + inference._move_default_rows(v_set);
        END LOOP;
        EXECUTE format('SELECT %I.run_maintenance(p_parent_table => $1)', v_partman)
          USING p_parent_table;
        FOREACH v_set IN ARRAY v_sets LOOP
            PERFORM inference._premake(v_set);
            v_after := v_after || inference._partitions(v_set);
            v_left := v_left + inference._default_rows(v_set);
        END LOOP;
    EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS v_message = MESSAGE_TEXT, v_context = PG_EXCEPTION_CONTEXT;
        PERFORM inference._log_failure('optimized_run_maintenance', p_parent_table, v_started,
                                       v_message);
        RAISE EXCEPTION 'partition maintenance failed: %', v_message
            USING DETAIL = v_context;
    END;

    v_result.status := 'done';
    v_result.partitions_created := inference._array_minus(v_after, v_before);
    v_result.partitions_dropped := inference._array_minus(v_before, v_after);
    v_result.rows_moved := v_moved;
    v_result.default_rows := v_left;
    v_result.seconds := round(extract(epoch FROM clock_timestamp() - v_started), 3);
    v_result.log_id := public.log_maintenance_performance(
        'optimized_run_maintenance', p_parent_table, v_started, clock_timestamp(),
        v_result.partitions_created, v_result.partitions_dropped, v_moved, v_left, 'done',
        jsonb_build_object('move_default', 'done', 'run_maintenance', 'done', 'premake', 'done',
                           'partition_sets', to_jsonb(v_sets)));
    RETURN v_result;
END
$$;

------------------------------------------------------------------------------------------------
-- parallel_run_maintenance
------------------------------------------------------------------------------------------------

CREATE FUNCTION inference.parallel_run_maintenance(p_schemas text[] DEFAULT NULL,
                                                   p_jobs integer DEFAULT 2)
RETURNS SETOF inference.maintenance_result
LANGUAGE plpgsql AS $$
DECLARE
    v_dblink   text := inference._extension_schema('dblink');
    v_started  timestamptz := clock_timestamp();
    v_jobs     integer;
    v_sets     text[];
    v_set      text;
    v_conns    text[] := '{}';
    v_busy_set text[];
    v_prefix   text;
    v_conninfo text;
    v_next     integer := 1;
    v_running  integer;
    v_collected boolean;
    v_is_busy  integer;
    v_row      jsonb;
    v_work     jsonb := '{}';
    v_error    text;
    v_result   inference.maintenance_result;
    v_failed   text[] := '{}';
    v_sql      text;
    w_status   text;
    w_started  text;
    w_finished text;
    w_before   text[];
    w_moved    bigint;
    w_steps    jsonb;
    w_detail   text;
    v_coldef   constant text := 'status text, started_at text, finished_at text, '
                                'partitions_before text[], rows_moved bigint, steps jsonb, '
                                'detail text';
    v_resdef   constant text := 'parent_table text, status text, partitions_created integer, '
                                'partitions_dropped integer, rows_moved bigint, '
                                'default_rows bigint, seconds numeric, log_id bigint, '
                                'detail text';
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtext('inference_gateway partition maintenance')) THEN
        RAISE NOTICE 'parallel_run_maintenance skipped: partition maintenance is already running '
                     'in another session';
        v_result.status := 'skipped';
        v_result.partitions_created := 0;
        v_result.partitions_dropped := 0;
        v_result.rows_moved := 0;
        v_result.detail := 'partition maintenance is already running in another session';
        v_result.seconds := round(extract(epoch FROM clock_timestamp() - v_started), 3);
        v_result.log_id := public.log_maintenance_performance(
            'parallel_run_maintenance', NULL, v_started, clock_timestamp(), 0, 0, 0, NULL,
            'skipped', '{}', v_result.detail);
        RETURN NEXT v_result;
        RETURN;
    END IF;

    v_sets := inference._select_partition_sets(p_schemas);
    IF cardinality(v_sets) = 0 THEN
        RAISE NOTICE 'parallel_run_maintenance: no partition set selected by %', p_schemas;
        RETURN;
    END IF;
    v_jobs := least(greatest(coalesce(p_jobs, 1), 1), cardinality(v_sets));

    IF v_dblink IS NULL THEN
        -- No way to open more connections: the same steps, one set after another, in this
        -- transaction.
        RAISE NOTICE 'dblink is not installed: maintaining % partition set(s) one after another',
            cardinality(v_sets);
        FOREACH v_set IN ARRAY v_sets LOOP
            BEGIN
                w_status := NULL;
                w_started := NULL;
                w_finished := NULL;
                w_before := NULL;
                w_moved := NULL;
                w_steps := NULL;
                w_detail := NULL;
                CALL inference._maintain_set_concurrently(v_set, false, w_status, w_started,
                                                          w_finished, w_before, w_moved, w_steps,
                                                          w_detail);
                v_row := jsonb_build_object('status', w_status, 'started_at', w_started,
                                            'partitions_before', to_jsonb(w_before),
                                            'rows_moved', w_moved, 'steps', w_steps,
                                            'detail', w_detail);
            EXCEPTION WHEN OTHERS THEN
                v_row := jsonb_build_object('status', 'failed', 'started_at', v_started,
                                            'partitions_before', inference._partitions(v_set),
                                            'rows_moved', 0, 'steps', '{}', 'detail', SQLERRM);
            END;
            v_result := inference._finish_partition_set(
                v_set, 'parallel_run_maintenance', (v_row ->> 'started_at')::timestamptz,
                ARRAY(SELECT jsonb_array_elements_text(v_row -> 'partitions_before')),
                (v_row ->> 'rows_moved')::bigint, v_row ->> 'status', v_row -> 'steps',
                v_row ->> 'detail');
            IF v_result.status = 'failed' THEN
                v_failed := v_failed || format('%s (%s)', v_set, v_result.detail);
            END IF;
            RETURN NEXT v_result;
        END LOOP;
        IF cardinality(v_failed) > 0 THEN
            RAISE EXCEPTION 'partition maintenance failed for %', array_to_string(v_failed, ', ');
        END IF;
        RETURN;
    END IF;

    v_prefix := format('inference_maintenance_%s_%s_', pg_backend_pid(),
                       floor(random() * 1000000000)::bigint);
    v_conninfo := inference._conninfo(current_database());
    BEGIN
        FOR i IN 1..v_jobs LOOP
            EXECUTE format('SELECT %I.dblink_connect($1, $2)', v_dblink)
              USING v_prefix || i, v_conninfo;
            v_conns := v_conns || (v_prefix || i);
        END LOOP;
        v_busy_set := array_fill(NULL::text, ARRAY[v_jobs]);

        -- Concurrent phase: keep every connection busy until each set has had its turn.
        LOOP
            FOR i IN 1..v_jobs LOOP
                IF v_busy_set[i] IS NULL AND v_next <= cardinality(v_sets) THEN
                    v_sql := format('CALL inference._maintain_set_concurrently(%L, true)',
                                    v_sets[v_next]);
                    EXECUTE format('SELECT %I.dblink_send_query($1, $2)', v_dblink)
                      USING v_conns[i], v_sql;
                    v_busy_set[i] := v_sets[v_next];
                    v_next := v_next + 1;
                END IF;
            END LOOP;

            v_running := 0;
            v_collected := false;
            FOR i IN 1..v_jobs LOOP
                CONTINUE WHEN v_busy_set[i] IS NULL;
                EXECUTE format('SELECT %I.dblink_is_busy($1)', v_dblink)
                   INTO v_is_busy USING v_conns[i];
                IF v_is_busy = 1 THEN
                    v_running := v_running + 1;
                    CONTINUE;
                END IF;
                v_row := NULL;
                EXECUTE format('SELECT to_jsonb(t) FROM %I.dblink_get_result($1, false) AS t(%s)',
                               v_dblink, v_coldef)
                   INTO v_row USING v_conns[i];
                IF v_row IS NULL THEN
                    EXECUTE format('SELECT %I.dblink_error_message($1)', v_dblink)
                       INTO v_error USING v_conns[i];
                    v_row := jsonb_build_object(
                        'status', 'failed', 'started_at', v_started,
                        'partitions_before', inference._partitions(v_busy_set[i]),
                        'rows_moved', 0, 'steps', '{}',
                        'detail', coalesce(nullif(v_error, 'OK'), 'no result from the worker'));
                END IF;
                -- An asynchronous query ends with an empty result; read it to free the
                -- connection.
                EXECUTE format('SELECT count(*) FROM %I.dblink_get_result($1, false) AS t(%s)',
                               v_dblink, v_coldef)
                  USING v_conns[i];
                v_work := v_work || jsonb_build_object(v_busy_set[i], v_row);
                v_busy_set[i] := NULL;
                v_collected := true;
            END LOOP;

            EXIT WHEN v_running = 0 AND v_next > cardinality(v_sets)
                      AND NOT EXISTS (SELECT 1 FROM unnest(v_busy_set) AS b WHERE b IS NOT NULL);
            IF NOT v_collected THEN
                PERFORM pg_sleep(0.01);
            END IF;
        END LOOP;

        -- Serial phase: retention (pg_partman's drop_partition_time has one lock for all sets)
        -- and the log row of each set, committed on a worker connection so that the rows stay
        -- even if this call ends in an error.
        FOREACH v_set IN ARRAY v_sets LOOP
            v_row := v_work -> v_set;
            v_sql := format('SELECT * FROM inference._finish_partition_set(%L, %L, %L::timestamptz, '
                            '%L::text[], %L::bigint, %L, %L::jsonb, %L)',
                            v_set, 'parallel_run_maintenance', v_row ->> 'started_at',
                            ARRAY(SELECT jsonb_array_elements_text(v_row -> 'partitions_before')),
                            v_row ->> 'rows_moved', v_row ->> 'status', v_row -> 'steps',
                            v_row ->> 'detail');
            v_result := NULL;
            EXECUTE format('SELECT * FROM %I.dblink($1, $2, false) AS t(%s)', v_dblink, v_resdef)
               INTO v_result USING v_conns[1], v_sql;
            IF v_result.status IS NULL THEN
                EXECUTE format('SELECT %I.dblink_error_message($1)', v_dblink)
                   INTO v_error USING v_conns[1];
                v_result.parent_table := v_set;
                v_result.status := 'failed';
                v_result.detail := concat_ws('; ', v_row ->> 'detail', v_error);
                v_result.log_id := inference._log_failure(
                    'parallel_run_maintenance', v_set, (v_row ->> 'started_at')::timestamptz,
                    v_result.detail, v_row -> 'steps');
            END IF;
            IF v_result.status = 'failed' THEN
                v_failed := v_failed || format('%s (%s)', v_set, v_result.detail);
            END IF;
            RETURN NEXT v_result;
        END LOOP;

        FOREACH v_set IN ARRAY v_conns LOOP
            EXECUTE format('SELECT %I.dblink_disconnect($1)', v_dblink) USING v_set;
        END LOOP;
        v_conns := '{}';
    EXCEPTION WHEN OTHERS OR query_canceled THEN
        GET STACKED DIAGNOSTICS v_error = MESSAGE_TEXT;
        FOREACH v_set IN ARRAY v_conns LOOP
            BEGIN
                EXECUTE format('SELECT %I.dblink_cancel_query($1)', v_dblink) USING v_set;
                EXECUTE format('SELECT %I.dblink_disconnect($1)', v_dblink) USING v_set;
            EXCEPTION WHEN OTHERS THEN
                NULL;
            END;
        END LOOP;
        RAISE;
    END;

    IF cardinality(v_failed) > 0 THEN
        RAISE EXCEPTION 'partition maintenance failed for %', array_to_string(v_failed, ', ');
    END IF;
    RETURN;
END
$$;

------------------------------------------------------------------------------------------------
-- Status and scheduling
------------------------------------------------------------------------------------------------

-- The partitions of every set with their bounds, rows and size. Row counts are the planner's
-- estimates unless p_exact (the default partition, and never-analysed ones, are always counted).
CREATE FUNCTION inference.partition_overview(p_exact boolean DEFAULT false)
RETURNS TABLE (parent_table text, partition_name text, is_default boolean, range_from text,
               range_to text, row_count bigint, row_count_exact boolean, total_bytes bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_partman text := inference._extension_schema('pg_partman');
    v_parent  text;
    v_child   record;
BEGIN
    FOR v_parent IN EXECUTE format('SELECT parent_table FROM %I.part_config ORDER BY 1', v_partman)
    LOOP
        FOR v_child IN
            SELECT c.oid, format('%I.%I', n.nspname, c.relname) AS name, c.reltuples,
                   pg_catalog.pg_get_expr(c.relpartbound, c.oid) AS bound
              FROM pg_catalog.pg_inherits i
              JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid
              JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
             WHERE i.inhparent = inference._parent_oid(v_parent)
             ORDER BY (pg_catalog.pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT') DESC, c.relname
        LOOP
            parent_table := v_parent;
            partition_name := v_child.name;
            is_default := v_child.bound = 'DEFAULT';
            range_from := substring(v_child.bound FROM $r$FROM \('?([^')]*)'?\)$r$);
            range_to := substring(v_child.bound FROM $r$TO \('?([^')]*)'?\)$r$);
            row_count_exact := p_exact OR is_default OR v_child.reltuples < 0;
            IF row_count_exact THEN
                EXECUTE format('SELECT count(*) FROM ONLY %s', v_child.name) INTO row_count;
            ELSE
                row_count := v_child.reltuples::bigint;
            END IF;
            total_bytes := pg_catalog.pg_total_relation_size(v_child.oid);
            RETURN NEXT;
        END LOOP;
    END LOOP;
END
$$;

CREATE FUNCTION inference._cron_job_name() RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN octet_length('partition maintenance: ' || current_database()) <= 63
                THEN 'partition maintenance: ' || current_database()
                ELSE 'partition maintenance: ' || md5(current_database()) END
$$;

-- Why pg_cron cannot be used from this database, or NULL when it can.
CREATE FUNCTION inference._cron_unavailable() RETURNS text
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pg_cron') THEN
        RETURN 'pg_cron is not installed on this server';
    END IF;
    IF current_setting('shared_preload_libraries') !~ '(^|[ ,])pg_cron($|[ ,])' THEN
        RETURN 'pg_cron is not in shared_preload_libraries';
    END IF;
    IF coalesce(current_setting('cron.database_name', true), 'postgres') <> current_database()
       AND inference._extension_schema('dblink') IS NULL THEN
        RETURN format('pg_cron lives in database %s and dblink is not installed here',
                      coalesce(current_setting('cron.database_name', true), 'postgres'));
    END IF;
    RETURN NULL;
END
$$;

-- Run one statement in the pg_cron database (here or over dblink); returns its first column,
-- or NULL when p_returns_row is false (for statements that return no row).
CREATE FUNCTION inference._in_cron_database(p_sql text, p_returns_row boolean DEFAULT true)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_cron_db text := coalesce(current_setting('cron.database_name', true), 'postgres');
    v_dblink  text := inference._extension_schema('dblink');
    v_result  text;
BEGIN
    IF v_cron_db = current_database() THEN
        IF p_returns_row THEN
            EXECUTE p_sql INTO v_result;
        ELSE
            EXECUTE p_sql;
        END IF;
    ELSIF p_returns_row THEN
        EXECUTE format('SELECT t.r FROM %I.dblink($1, $2) AS t(r text)', v_dblink)
           INTO v_result USING inference._conninfo(v_cron_db), p_sql;
    ELSE
        EXECUTE format('SELECT %I.dblink_exec($1, $2)', v_dblink)
          USING inference._conninfo(v_cron_db), p_sql;
    END IF;
    RETURN v_result;
END
$$;

-- Create or update, by name, the pg_cron job that runs optimized_run_maintenance() in this
-- database, and remove other jobs that run pg_partman maintenance here. Returns a description;
-- never fails because pg_cron is missing.
CREATE FUNCTION inference.schedule_maintenance(p_schedule text DEFAULT NULL) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_schedule text;
    v_job      text := inference._cron_job_name();
    v_cron_db  text := coalesce(current_setting('cron.database_name', true), 'postgres');
    v_why      text := inference._cron_unavailable();
    v_jobid    text;
    v_removed  text;
    v_detail   text;
BEGIN
    SELECT coalesce(p_schedule, schedule) INTO v_schedule FROM inference.maintenance_settings;
    IF v_why IS NULL THEN
        BEGIN
            PERFORM inference._in_cron_database('CREATE EXTENSION IF NOT EXISTS pg_cron', false);
            v_removed := inference._in_cron_database(format(
                'SELECT count(cron.unschedule(jobid))::text FROM cron.job '
                'WHERE database = %L AND jobname IS DISTINCT FROM %L '
                'AND command ~* ''run_maintenance''', current_database(), v_job));
            -- Jobs of ours left behind by databases that were dropped since.
            PERFORM inference._in_cron_database(
                'SELECT count(cron.unschedule(jobid))::text FROM cron.job '
                'WHERE jobname LIKE ''partition maintenance: %'' '
                'AND command = ''SELECT inference.optimized_run_maintenance()'' '
                'AND database NOT IN (SELECT datname FROM pg_database)');
            v_jobid := inference._in_cron_database(format(
                'SELECT cron.schedule_in_database(%L, %L, %L, %L)::text',
                v_job, v_schedule, 'SELECT inference.optimized_run_maintenance()',
                current_database()));
        EXCEPTION WHEN OTHERS THEN
            v_why := format('pg_cron could not schedule the job: %s', SQLERRM);
        END;
    END IF;

    IF v_why IS NULL THEN
        v_detail := format('pg_cron job %s (%s) in database %s, schedule %s (GMT)',
                           v_jobid, v_job, v_cron_db, v_schedule);
        IF v_removed::integer > 0 THEN
            v_detail := v_detail || format('; replaced %s earlier pg_partman job(s)', v_removed);
        END IF;
        UPDATE inference.maintenance_settings
           SET schedule = v_schedule, scheduler = 'pg_cron', scheduler_detail = v_detail,
               updated_at = now();
    ELSE
        v_detail := format('%s: run "inference-gateway maintenance schedule" (or let the gateway '
                           'run it), schedule %s (GMT)', v_why, v_schedule);
        RAISE NOTICE 'partition maintenance is not scheduled by pg_cron: %', v_detail;
        UPDATE inference.maintenance_settings
           SET schedule = v_schedule, scheduler = 'gateway', scheduler_detail = v_detail,
               updated_at = now();
    END IF;
    RETURN v_detail;
END
$$;

-- Remove this database's pg_cron job (before dropping the database, or to hand scheduling to the
-- gateway). Returns whether a job was removed.
CREATE FUNCTION inference.unschedule_maintenance() RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_removed text;
BEGIN
    IF inference._cron_unavailable() IS NOT NULL THEN
        RETURN false;
    END IF;
    v_removed := inference._in_cron_database(format(
        'SELECT count(cron.unschedule(jobid))::text FROM cron.job WHERE jobname = %L '
        'AND database = %L', inference._cron_job_name(), current_database()));
    UPDATE inference.maintenance_settings
       SET scheduler = 'gateway', scheduler_detail = 'pg_cron job removed', updated_at = now();
    RETURN v_removed::integer > 0;
END
$$;

-- The pg_cron jobs that run in this database, with their latest run.
CREATE FUNCTION inference.maintenance_cron_status()
RETURNS TABLE (jobid bigint, jobname text, schedule text, command text, active boolean,
               is_maintenance_job boolean, last_status text, last_start timestamptz,
               last_end timestamptz, last_message text)
LANGUAGE plpgsql AS $$
DECLARE
    v_cron_db text := coalesce(current_setting('cron.database_name', true), 'postgres');
    v_sql     text;
    v_cols    constant text := 'jobid bigint, jobname text, schedule text, command text, '
                               'active boolean, is_maintenance_job boolean, last_status text, '
                               'last_start timestamptz, last_end timestamptz, last_message text';
BEGIN
    IF inference._cron_unavailable() IS NOT NULL THEN
        RETURN;
    END IF;
    v_sql := format(
        'SELECT j.jobid, j.jobname::text, j.schedule, j.command, j.active, j.jobname = %L, '
        '       d.status, d.start_time, d.end_time, d.return_message '
        '  FROM cron.job j '
        '  LEFT JOIN LATERAL (SELECT * FROM cron.job_run_details r WHERE r.jobid = j.jobid '
        '                      ORDER BY r.runid DESC LIMIT 1) d ON true '
        ' WHERE j.database = %L ORDER BY j.jobid',
        inference._cron_job_name(), current_database());
    BEGIN
        IF v_cron_db = current_database() THEN
            RETURN QUERY EXECUTE v_sql;
        ELSE
            RETURN QUERY EXECUTE format('SELECT * FROM %I.dblink($1, $2) AS t(%s)',
                                        inference._extension_schema('dblink'), v_cols)
                USING inference._conninfo(v_cron_db), v_sql;
        END IF;
    EXCEPTION WHEN OTHERS THEN
        RAISE NOTICE 'cannot read the pg_cron jobs: %', SQLERRM;
    END;
END
$$;

-- Apply the gateway's settings: retention of a partition set (NULL or '' keeps everything),
-- drop or detach, the slow-run threshold and the schedule.
CREATE FUNCTION inference.configure_maintenance(
    p_retention      text,
    p_keep_table     boolean,
    p_schedule       text,
    p_warn_after_sec numeric,
    p_parent_table   text DEFAULT 'inference.requests'
) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_partman   text := inference._extension_schema('pg_partman');
    v_retention interval;
    v_found     boolean;
BEGIN
    IF nullif(btrim(coalesce(p_retention, '')), '') IS NOT NULL
       AND lower(btrim(p_retention)) NOT IN ('none', 'forever', 'off') THEN
        BEGIN
            v_retention := p_retention::interval;
        EXCEPTION WHEN OTHERS THEN
            RAISE EXCEPTION 'invalid REQUESTS_RETENTION %: not an interval', p_retention
                USING HINT = 'For example "13 months" or "90 days".';
        END;
        IF v_retention <= interval '0' THEN
            RAISE EXCEPTION 'invalid REQUESTS_RETENTION %: must be positive', p_retention;
        END IF;
    END IF;

    EXECUTE format('UPDATE %I.part_config SET retention = $1, retention_keep_table = $2, '
                   'infinite_time_partitions = true WHERE parent_table = $3 RETURNING true',
                   v_partman)
       INTO v_found USING v_retention::text, coalesce(p_keep_table, false), p_parent_table;
    IF v_found IS NULL THEN
        RAISE EXCEPTION 'no pg_partman partition set is named %', p_parent_table;
    END IF;

    UPDATE inference.maintenance_settings
       SET warn_after_sec = coalesce(p_warn_after_sec, warn_after_sec), updated_at = now();
    RETURN format('%s: retention %s (%s); ', p_parent_table,
                  coalesce(v_retention::text, 'none'),
                  CASE WHEN coalesce(p_keep_table, false) THEN 'detach' ELSE 'drop' END)
        || inference.schedule_maintenance(nullif(btrim(coalesce(p_schedule, '')), ''));
END
$$;

------------------------------------------------------------------------------------------------
-- Unqualified names, as the README uses them: thin wrappers in public (and
-- log_maintenance_performance, which lives there itself).
------------------------------------------------------------------------------------------------

CREATE FUNCTION public.optimized_run_maintenance(p_parent_table text DEFAULT NULL)
RETURNS inference.maintenance_result
LANGUAGE sql AS $$ SELECT inference.optimized_run_maintenance(p_parent_table) $$;

CREATE FUNCTION public.parallel_run_maintenance(p_schemas text[] DEFAULT NULL,
                                                p_jobs integer DEFAULT 2)
RETURNS SETOF inference.maintenance_result
LANGUAGE sql AS $$ SELECT * FROM inference.parallel_run_maintenance(p_schemas, p_jobs) $$;

CREATE VIEW public.maintenance_performance_analysis AS
    SELECT * FROM inference.maintenance_performance_analysis;

-- Keep premaking on a quiet table (0001 set it; a fresh look costs nothing) and schedule the
-- default run; the gateway's settings are applied right after migrating.
DO $$
BEGIN
    EXECUTE format('UPDATE %I.part_config SET infinite_time_partitions = true '
                   'WHERE parent_table = %L', inference._extension_schema('pg_partman'),
                   'inference.requests');
END
$$;
SELECT inference.schedule_maintenance();
