-- The original server's migration created a table public.maintenance_performance_log
-- (function_name, start_time, end_time, duration, rows_processed, partitions_created,
-- partitions_dropped, additional_info); queries and dashboards built on it keep working against
-- this view over inference.maintenance_log, which holds every run now.
--   duration         an interval, as end_time - start_time was
--   rows_processed   rows moved out of the default partition
--   additional_info  a JSON object: parent table, status, the steps taken, the detail
CREATE VIEW public.maintenance_performance_log AS
SELECT id,
       function_name,
       started_at                 AS start_time,
       finished_at                AS end_time,
       finished_at - started_at   AS duration,
       rows_moved                 AS rows_processed,
       partitions_created,
       partitions_dropped,
       jsonb_strip_nulls(jsonb_build_object(
           'parent_table', parent_table,
           'status', status,
           'default_rows', default_rows,
           'steps', steps,
           'detail', detail))     AS additional_info
  FROM inference.maintenance_log;
