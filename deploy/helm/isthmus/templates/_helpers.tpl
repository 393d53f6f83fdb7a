{{/* The prefix of every object's name. */}}
{{- define "isthmus.fullname" -}}
{{- default "isthmus" .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object. */}}
{{- define "isthmus.labels" -}}
app.kubernetes.io/name: isthmus
app.kubernetes.io/instance: {{ .Release.Name }}
{{ include "isthmus.metaLabels" . }}
{{- end -}}

{{/* The labels of every object but name and instance (pod templates add them with the selector). */}}
{{- define "isthmus.metaLabels" -}}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component ("control-plane", "eastwest-gateway"). */}}
{{- define "isthmus.selector" -}}
app.kubernetes.io/name: isthmus
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "isthmus.image" -}}
{{ .Values.image.repository }}:{{ default .Chart.AppVersion .Values.image.tag }}
{{- end -}}

{{/* The control plane Service's DNS names (certificate SANs). */}}
{{- define "isthmus.serviceNames" -}}
{{- $svc := printf "%s.%s.svc" (include "isthmus.fullname" .) .Release.Namespace -}}
{{ $svc }},{{ $svc }}.{{ .Values.clusterDomain }}
{{- end -}}

{{/* Pod anti-affinity on the node, "soft" or "hard"; . is (dict "mode" M "selector" YAML). */}}
{{- define "isthmus.antiAffinity" -}}
{{- if eq .mode "hard" }}
affinity:
  podAntiAffinity:
    requiredDuringSchedulingIgnoredDuringExecution:
      - topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- .selector | nindent 12 }}
{{- else if eq .mode "soft" }}
affinity:
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels:
              {{- .selector | nindent 14 }}
{{- else if ne .mode "" }}
{{- fail (printf "antiAffinity must be soft, hard or empty, not %q" .mode) }}
{{- end }}
{{- end -}}

{{/* The container security context every container of the chart has. */}}
{{- define "isthmus.containerSecurity" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: {{ . }}
  runAsGroup: {{ . }}
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: [ALL]
  seccompProfile:
    type: RuntimeDefault
{{- end -}}
