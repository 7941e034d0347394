{{/* Names are cut to fit Kubernetes' limits: 63 characters, less a suffix's room. */}}
{{- define "stowage.fullname" -}}
{{- if contains "stowage" .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-stowage" .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "stowage.agentName" -}}{{ include "stowage.fullname" . }}-agent{{- end -}}
{{- define "stowage.coordinatorName" -}}{{ include "stowage.fullname" . }}-coordinator{{- end -}}

{{- define "stowage.labels" -}}
app.kubernetes.io/part-of: stowage
app.kubernetes.io/instance: {{ .Release.Name | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end -}}

{{/* The agent's selector labels; the coordinator finds agents by these. */}}
{{- define "stowage.agentSelector" -}}
app.kubernetes.io/name: stowage-agent
app.kubernetes.io/instance: {{ .Release.Name | trunc 63 | trimSuffix "-" | quote }}
{{- end -}}

{{- define "stowage.coordinatorSelector" -}}
app.kubernetes.io/name: stowage-coordinator
app.kubernetes.io/instance: {{ .Release.Name | trunc 63 | trimSuffix "-" | quote }}
{{- end -}}

{{- define "stowage.agentImage" -}}
{{ .Values.image.agent.repository }}:{{ .Values.image.agent.tag | default .Chart.AppVersion }}
{{- end -}}
{{- define "stowage.coordinatorImage" -}}
{{ .Values.image.coordinator.repository }}:{{ .Values.image.coordinator.tag | default .Chart.AppVersion }}
{{- end -}}
{{/* The mount holders' image: coordinator.mountHolderImage, else Stowage's own pause image. */}}
{{- define "stowage.mountHolderImage" -}}
{{- if .Values.coordinator.mountHolderImage -}}
{{ .Values.coordinator.mountHolderImage }}
{{- else -}}
{{ .Values.image.pause.repository }}:{{ .Values.image.pause.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{/* Secret names of the mTLS material. */}}
{{- define "stowage.agentTlsSecret" -}}{{ include "stowage.fullname" . }}-agent-tls{{- end -}}
{{- define "stowage.coordinatorTlsSecret" -}}{{ include "stowage.fullname" . }}-coordinator-tls{{- end -}}
{{/* The name the coordinator verifies agents' certificates against, and the identity agents accept. */}}
{{- define "stowage.agentTlsName" -}}{{ include "stowage.agentName" . }}.{{ .Release.Namespace }}.svc{{- end -}}
{{- define "stowage.coordinatorTlsName" -}}{{ include "stowage.coordinatorName" . }}.{{ .Release.Namespace }}.svc{{- end -}}

{{/* Env shared by both components: the pod's identity from the downward API. */}}
{{- define "stowage.podEnv" -}}
- name: POD_NAME
  valueFrom: {fieldRef: {fieldPath: metadata.name}}
- name: POD_NAMESPACE
  valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
- name: POD_IP
  valueFrom: {fieldRef: {fieldPath: status.podIP}}
{{- end -}}

{{/* The watched namespaces, comma-separated ("" for every namespace): watchNamespace and
watchNamespaces together, without repeats. rbac.scope=namespaced needs at least one. */}}
{{- define "stowage.watchNamespaces" -}}
{{- $c := .Values.coordinator -}}
{{- $all := concat (list) ($c.watchNamespaces | default list) -}}
{{- if $c.watchNamespace -}}{{- $all = append $all $c.watchNamespace -}}{{- end -}}
{{- if and (eq (.Values.rbac | default dict).scope "namespaced") (empty $all) -}}
{{- fail "rbac.scope=namespaced needs coordinator.watchNamespace or coordinator.watchNamespaces: the rights are bound in those namespaces only" -}}
{{- end -}}
{{- $all | uniq | join "," -}}
{{- end -}}
