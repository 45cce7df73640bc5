"""What a reduced session produces and where it goes: report, notifications, ObsCore archive,
results database, the Night reports listing."""
