"""The hourly usage reporter and the sinks its events go to."""
