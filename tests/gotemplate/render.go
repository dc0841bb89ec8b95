// Renders an Ollama TEMPLATE with Go's text/template, the engine Ollama uses: reads {"template", "messages"} as
// JSON on stdin and prints the prompt Ollama would send to the model for those messages.
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Values struct {
	Messages []Message
	System   string
	Prompt   string
	Response string
}

func main() {
	var in struct {
		Template string    `json:"template"`
		Messages []Message `json:"messages"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	t := template.Must(template.New("modelfile").Parse(in.Template))
	if err := t.Execute(os.Stdout, Values{Messages: in.Messages}); err != nil {
		panic(err)
	}
}
