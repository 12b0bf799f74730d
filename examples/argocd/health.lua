-- Argo CD health of a DistillationJob or EvaluationJob (distill.potential-meme.io).
-- Healthy: Succeeded. Progressing: Pending or Running, or a spec the operator has not seen yet.
-- Degraded: Failed, Valid=False, or QualityGate=False (an evaluation whose student fell short of a gate).
-- Suspended: spec.suspend took effect.
local health = {status = "Progressing", message = "waiting for the operator"}
if obj.status == nil then
  return health
end
local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  health.message = "the operator has not reconciled generation " .. generation .. " yet"
  return health
end
local conditions = {}
for _, condition in ipairs(obj.status.conditions or {}) do
  conditions[condition.type] = condition
end
if conditions.Valid ~= nil and conditions.Valid.status == "False" then
  return {status = "Degraded", message = "invalid spec: " .. (conditions.Valid.message or "")}
end
if conditions.QualityGate ~= nil and conditions.QualityGate.status == "False" then
  return {status = "Degraded", message = "quality gate failed: " .. (conditions.QualityGate.message or "")}
end
local phase = obj.status.phase
local stage = obj.status.currentStage or ""
if phase == "Succeeded" then
  local artifacts = obj.status.artifacts or {}
  return {status = "Healthy", message = "succeeded " .. (artifacts.student or artifacts.results or "")}
elseif phase == "Failed" then
  local failed = conditions.Failed or {}
  return {status = "Degraded", message = (failed.reason or "Failed") .. ": " .. (failed.message or "")}
elseif phase == "Suspended" then
  return {status = "Suspended", message = "suspended at stage " .. stage}
end
local running = conditions.Running or {}
health.message = (phase or "Pending") .. (stage ~= "" and " " .. stage or "")
if phase ~= "Running" and running.message ~= nil and running.message ~= "" then
  health.message = health.message .. " (" .. running.message .. ")"
end
return health
