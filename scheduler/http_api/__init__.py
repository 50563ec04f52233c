"""torpord's OpenAI-compatible HTTP API (issue 14): `/v1/models`, `/v1/completions` and
`/v1/chat/completions`, served in torpord's event loop beside gRPC and run through the same
`SchedulerService.generate` as `Scheduler.Generate` (docs/API.md "HTTP")."""
