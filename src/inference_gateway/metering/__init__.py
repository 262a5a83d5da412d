"""The usage record, reading token counts from answers, and the durable path to Postgres."""
