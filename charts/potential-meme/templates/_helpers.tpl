{{- define "potential-meme.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "potential-meme.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "potential-meme.labels" -}}
app.kubernetes.io/name: {{ include "potential-meme.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "potential-meme.selectorLabels" -}}
app.kubernetes.io/name: {{ include "potential-meme.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* The rules the operator needs: exactly the API calls its end-to-end tests record (tests/chart). */}}
{{- define "potential-meme.rules" -}}
- apiGroups: ["distill.potential-meme.io"]
  resources: ["distillationjobs", "evaluationjobs"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["distill.potential-meme.io"]
  resources: ["distillationjobs/status", "evaluationjobs/status"]
  verbs: ["patch"]
- apiGroups: ["kubeflow.org"]
  resources: ["pytorchjobs"]
  verbs: ["create", "get", "list", "watch", "patch", "delete"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["create", "get"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end -}}

{{/* kopf peering: the replicas see each other through a peering object of this resource. */}}
{{- define "potential-meme.peeringRules" -}}
- apiGroups: ["kopf.dev"]
  resources: [{{ .resource | quote }}]
  verbs: ["get", "list", "watch", "patch"]
{{- end -}}
