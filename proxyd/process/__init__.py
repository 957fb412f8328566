"""The processes proxyd runs as: one serving process (single), or a supervisor and its workers
(supervisor, worker); what they share: the admin app, the SIGHUP reloader, sd_notify, the loop."""
