//! Strict streaming parser for Salesforce Outbound Message SOAP 1.1 envelopes, plus the ack and fault bodies we answer with.

use std::collections::{BTreeSet, HashSet};

use quick_xml::escape::EscapeError;
use quick_xml::events::{BytesStart, BytesText, Event};
use quick_xml::name::{QName, ResolveResult};
use quick_xml::NsReader;

use crate::domain::{Fields, Notification, NotificationId, OrgId, OutboundMessage};

/// Deepest element nesting accepted. A real message is 6 levels deep
/// (Envelope/Body/notifications/Notification/sObject/field); the slack is for SOAP headers.
pub const MAX_DEPTH: usize = 32;

/// Most `Notification` elements one message may carry (the WSDL's `maxOccurs="100"`).
pub const MAX_NOTIFICATIONS: usize = 100;
/// Attributes (namespace declarations included) allowed on one element. Salesforce uses at
/// most three; the cap bounds quick-xml's duplicate-attribute check and prefix lookups, which
/// grow with the square of the attribute count (found by fuzzing: 300,000 attributes took 51 s).
pub const MAX_ATTRIBUTES: usize = 16;

const NS_SOAP11: &[u8] = b"http://schemas.xmlsoap.org/soap/envelope/";
const NS_SOAP12: &[u8] = b"http://www.w3.org/2003/05/soap-envelope";
const NS_OUTBOUND: &[u8] = b"http://soap.sforce.com/2005/09/outbound";
const NS_XSI: &[u8] = b"http://www.w3.org/2001/XMLSchema-instance";
const NS_SOBJECT_ENTERPRISE: &[u8] = b"urn:sobject.enterprise.soap.sforce.com";
const NS_SOBJECT_PARTNER: &[u8] = b"urn:sobject.partner.soap.sforce.com";

/// Salesforce API names are at most ~80 characters even with a namespace prefix and `__c`;
/// the cap only keeps absurd names out of map keys and logs.
const MAX_API_NAME_LEN: usize = 128;

/// Why a body was refused. `Display` is a fixed message that never echoes the input,
/// so it is safe to put in a SOAP Fault or a log line.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SoapError {
    /// Zero-byte body.
    #[error("request body is empty")]
    EmptyBody,
    /// The body is not UTF-8.
    #[error("request body is not valid UTF-8")]
    InvalidUtf8,
    /// The XML declaration names an encoding other than UTF-8.
    #[error("XML encoding must be UTF-8")]
    UnsupportedEncoding,
    /// Syntax error, mismatched or missing end tag, truncation, content outside the root, etc.
    #[error("request body is not well-formed XML")]
    MalformedXml,
    /// A `<!DOCTYPE>` anywhere in the document (XXE and entity-expansion defence).
    #[error("DTDs (<!DOCTYPE>) are not allowed")]
    DoctypeForbidden,
    /// An entity reference other than the five predefined ones.
    #[error("XML references an undeclared entity")]
    UndeclaredEntity,
    /// An element or attribute uses a namespace prefix with no in-scope declaration.
    #[error("XML uses an undeclared namespace prefix")]
    UndeclaredPrefix,
    /// Elements nested deeper than [`MAX_DEPTH`].
    #[error("XML elements are nested too deeply")]
    TooDeep,
    /// An element with more than [`MAX_ATTRIBUTES`] attributes.
    #[error("an XML element has too many attributes")]
    TooManyAttributes,
    /// The root element is not a SOAP 1.1 `Envelope`.
    #[error("root element is not a SOAP 1.1 Envelope")]
    NotSoapEnvelope,
    /// The root element is a SOAP 1.2 `Envelope`.
    #[error("SOAP 1.2 is not supported; Outbound Messages use SOAP 1.1")]
    Soap12Unsupported,
    /// The Envelope has no `Body`.
    #[error("SOAP Envelope has no Body")]
    MissingBody,
    /// The Body holds no `notifications` element.
    #[error("SOAP Body does not contain a notifications element")]
    MissingNotifications,
    /// `notifications` is in another namespace (or none) instead of the Outbound Message one.
    #[error("notifications element is not in the Outbound Message namespace")]
    WrongNamespace,
    /// An element that is not part of the Outbound Message schema at that position.
    #[error("unexpected element in the message")]
    UnexpectedElement,
    /// An element that may appear once appears again (Header, Body, notifications, ids, ...).
    #[error("an element that may appear only once appears more than once")]
    DuplicateElement,
    /// Non-whitespace text where only elements are allowed.
    #[error("unexpected text between elements")]
    UnexpectedText,
    /// `OrganizationId` is absent or nil.
    #[error("OrganizationId is missing")]
    MissingOrganizationId,
    /// `OrganizationId` is not 15 or 18 letters and digits.
    #[error("OrganizationId must be 15 or 18 letters and digits")]
    InvalidOrganizationId,
    /// `ActionId` is absent or nil.
    #[error("ActionId is missing")]
    MissingActionId,
    /// `ActionId` is not 1 to 18 letters and digits.
    #[error("ActionId must be at most 18 letters and digits")]
    InvalidActionId,
    /// No `Notification` element.
    #[error("message contains no Notification")]
    NoNotifications,
    /// More than [`MAX_NOTIFICATIONS`] `Notification` elements.
    #[error("message contains more than 100 notifications")]
    TooManyNotifications,
    /// A `Notification` without `Id` (nothing to deduplicate on).
    #[error("Notification Id is missing")]
    MissingNotificationId,
    /// A Notification `Id` that is not exactly 18 letters and digits.
    #[error("Notification Id must be exactly 18 letters and digits")]
    InvalidNotificationId,
    /// A `Notification` without `sObject`.
    #[error("Notification has no sObject")]
    MissingSObject,
    /// An `sObject` without `xsi:type` (cannot be routed).
    #[error("sObject has no xsi:type")]
    MissingSObjectType,
    /// The `xsi:type` QName uses a prefix that is not declared where it is used.
    #[error("sObject xsi:type uses an undeclared namespace prefix")]
    UnresolvableTypePrefix,
    /// The `xsi:type` QName resolves outside the enterprise/partner sObject namespaces.
    #[error("sObject xsi:type is not in a Salesforce sObject namespace")]
    UnsupportedSObjectNamespace,
    /// The `xsi:type` local part is not a Salesforce API name.
    #[error("sObject xsi:type is not a valid Salesforce object name")]
    InvalidSObjectType,
    /// A field element whose name is not a Salesforce API name.
    #[error("sObject field name is not a valid Salesforce field name")]
    InvalidFieldName,
    /// A field element containing child elements (Salesforce sends flat fields only).
    #[error("sObject field contains nested elements")]
    NestedField,
    /// The same field appears twice in one sObject (or is both sent and listed in fieldsToNull).
    #[error("sObject field appears more than once")]
    DuplicateField,
    /// A `fieldsToNull` entry that is not a Salesforce API name.
    #[error("fieldsToNull does not name a valid Salesforce field")]
    InvalidFieldsToNull,
    /// `xsi:nil` with a value other than true/false/1/0.
    #[error("xsi:nil must be true, false, 1 or 0")]
    InvalidNil,
    /// The sObject `Id` field is not a 15- or 18-character record id.
    #[error("sObject Id must be 15 or 18 letters and digits")]
    InvalidRecordId,
}

impl SoapError {
    /// Stable snake_case code for metrics, logs and API responses.
    pub fn code(&self) -> &'static str {
        match self {
            Self::EmptyBody => "empty_body",
            Self::InvalidUtf8 => "invalid_utf8",
            Self::UnsupportedEncoding => "unsupported_encoding",
            Self::MalformedXml => "malformed_xml",
            Self::DoctypeForbidden => "doctype_forbidden",
            Self::UndeclaredEntity => "undeclared_entity",
            Self::UndeclaredPrefix => "undeclared_prefix",
            Self::TooDeep => "too_deep",
            Self::TooManyAttributes => "too_many_attributes",
            Self::NotSoapEnvelope => "not_soap_envelope",
            Self::Soap12Unsupported => "soap12_unsupported",
            Self::MissingBody => "missing_body",
            Self::MissingNotifications => "missing_notifications",
            Self::WrongNamespace => "wrong_namespace",
            Self::UnexpectedElement => "unexpected_element",
            Self::DuplicateElement => "duplicate_element",
            Self::UnexpectedText => "unexpected_text",
            Self::MissingOrganizationId => "missing_organization_id",
            Self::InvalidOrganizationId => "invalid_organization_id",
            Self::MissingActionId => "missing_action_id",
            Self::InvalidActionId => "invalid_action_id",
            Self::NoNotifications => "no_notifications",
            Self::TooManyNotifications => "too_many_notifications",
            Self::MissingNotificationId => "missing_notification_id",
            Self::InvalidNotificationId => "invalid_notification_id",
            Self::MissingSObject => "missing_sobject",
            Self::MissingSObjectType => "missing_sobject_type",
            Self::UnresolvableTypePrefix => "unresolvable_type_prefix",
            Self::UnsupportedSObjectNamespace => "unsupported_sobject_namespace",
            Self::InvalidSObjectType => "invalid_sobject_type",
            Self::InvalidFieldName => "invalid_field_name",
            Self::NestedField => "nested_field",
            Self::DuplicateField => "duplicate_field",
            Self::InvalidFieldsToNull => "invalid_fields_to_null",
            Self::InvalidNil => "invalid_nil",
            Self::InvalidRecordId => "invalid_record_id",
        }
    }
}

/// The exact acknowledgement body (HTTP 200, `text/xml; charset=utf-8`), byte-identical to
/// `examples/salesforce/response_ack_true.xml`. Anything else may make Salesforce retry.
pub const ACK_TRUE: &str = concat!(
    "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n",
    "<soapenv:Envelope xmlns:soapenv=\"http://schemas.xmlsoap.org/soap/envelope/\" ",
    "xmlns:xsd=\"http://www.w3.org/2001/XMLSchema\" ",
    "xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\">\n",
    " <soapenv:Body>\n",
    "  <notificationsResponse xmlns=\"http://soap.sforce.com/2005/09/outbound\">\n",
    "   <Ack>true</Ack>\n",
    "  </notificationsResponse>\n",
    " </soapenv:Body>\n",
    "</soapenv:Envelope>\n",
);

/// A SOAP 1.1 Fault envelope with faultcode `soapenv:Server` (when `server_side`) or
/// `soapenv:Client`, and `message` XML-escaped as the faultstring.
pub fn render_fault(server_side: bool, message: &str) -> String {
    let code = if server_side {
        "soapenv:Server"
    } else {
        "soapenv:Client"
    };
    let message = escape_text(message);
    format!(
        concat!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n",
            "<soapenv:Envelope xmlns:soapenv=\"http://schemas.xmlsoap.org/soap/envelope/\" ",
            "xmlns:xsd=\"http://www.w3.org/2001/XMLSchema\" ",
            "xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\">\n",
            " <soapenv:Body>\n",
            "  <soapenv:Fault>\n",
            "   <faultcode>{code}</faultcode>\n",
            "   <faultstring>{message}</faultstring>\n",
            "   <detail />\n",
            "  </soapenv:Fault>\n",
            " </soapenv:Body>\n",
            "</soapenv:Envelope>\n",
        ),
        code = code,
        message = message,
    )
}

/// Escapes markup characters, and replaces characters XML 1.0 cannot carry at all, so the
/// fault stays well-formed whatever the caller passes in.
fn escape_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if c < ' ' || c == '\u{FFFE}' || c == '\u{FFFF}' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// Parses and validates one Outbound Message body.
///
/// Checks the envelope only: whether the org is ours is the caller's decision
/// (`OrgId::same_org`). Duplicate Notification Ids inside the message are dropped after the
/// first. The SessionId's value is never retained, only whether one was sent.
pub fn parse_outbound_message(body: &[u8]) -> Result<OutboundMessage, SoapError> {
    if body.is_empty() {
        return Err(SoapError::EmptyBody);
    }
    let text = std::str::from_utf8(body).map_err(|_| SoapError::InvalidUtf8)?;
    Parser::new(text).document()
}

/// Namespace of an element, reduced to the ones this parser cares about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ns {
    None,
    Soap11,
    Soap12,
    Outbound,
    SObject,
    Other,
}

fn classify(res: &ResolveResult) -> Result<Ns, SoapError> {
    match res {
        ResolveResult::Unbound => Ok(Ns::None),
        ResolveResult::Unknown(_) => Err(SoapError::UndeclaredPrefix),
        ResolveResult::Bound(ns) => Ok(match ns.0 {
            NS_SOAP11 => Ns::Soap11,
            NS_SOAP12 => Ns::Soap12,
            NS_OUTBOUND => Ns::Outbound,
            NS_SOBJECT_ENTERPRISE | NS_SOBJECT_PARTNER => Ns::SObject,
            _ => Ns::Other,
        }),
    }
}

/// quick-xml error details can quote the input, so only the kind survives.
fn xml_err(e: quick_xml::Error) -> SoapError {
    match e {
        quick_xml::Error::Escape(EscapeError::UnrecognizedEntity(..)) => {
            SoapError::UndeclaredEntity
        }
        _ => SoapError::MalformedXml,
    }
}

fn is_xml_ws(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .all(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
}

fn trim_xml_ws(s: &str) -> &str {
    s.trim_matches(|c| matches!(c, ' ' | '\t' | '\r' | '\n'))
}

/// Salesforce object and field API names: a letter, then letters, digits and underscores.
fn is_api_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_API_NAME_LEN
        && b[0].is_ascii_alphabetic()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

fn is_alnum_len(s: &str, lens: &[usize]) -> bool {
    lens.contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// `xsd:boolean` lexical space, after the whitespace collapse XML Schema applies to it.
fn parse_xsd_bool(s: &str) -> Option<bool> {
    match trim_xml_ws(s) {
        "true" | "1" => Some(true),
        "false" | "0" => Some(false),
        _ => None,
    }
}

/// One XML event after comments, PIs and the declaration are filtered out.
enum Ev<'i> {
    Start(Ns, BytesStart<'i>),
    Empty(Ns, BytesStart<'i>),
    End,
    Text(BytesText<'i>),
    CData(quick_xml::events::BytesCData<'i>),
    Eof,
}

/// What can follow inside an element whose content is elements only.
enum Child<'i> {
    Element {
        ns: Ns,
        start: BytesStart<'i>,
        empty: bool,
    },
    End,
}

/// The `xsi:` attributes this parser interprets.
#[derive(Default)]
struct XsiAttrs {
    nil: bool,
    type_qname: Option<String>,
}

/// Recursive descent over the fixed Outbound Message shape. Recursion depth is bounded by
/// that shape (at most 6 frames); arbitrary nesting is only ever walked by loops that count
/// depth, so hostile nesting cannot overflow the stack.
struct Parser<'i> {
    reader: NsReader<&'i [u8]>,
    depth: usize,
    seen_event: bool,
}

impl<'i> Parser<'i> {
    fn new(text: &'i str) -> Self {
        let mut reader = NsReader::from_str(text);
        let config = reader.config_mut();
        config.check_end_names = true;
        config.allow_unmatched_ends = false;
        config.check_comments = true;
        config.expand_empty_elements = false;
        config.trim_text(false);
        Self {
            reader,
            depth: 0,
            seen_event: false,
        }
    }

    /// Next significant event. Enforces the depth cap, DOCTYPE rejection, declared
    /// prefixes and attribute well-formedness for every element, not only the ones we read.
    fn next(&mut self) -> Result<Ev<'i>, SoapError> {
        loop {
            let (res, event) = self.reader.read_resolved_event().map_err(xml_err)?;
            let ns = classify(&res);
            let first = !self.seen_event;
            self.seen_event = true;
            match event {
                Event::Start(e) => {
                    let ns = ns?;
                    if self.depth >= MAX_DEPTH {
                        return Err(SoapError::TooDeep);
                    }
                    self.depth += 1;
                    self.check_attributes(&e)?;
                    return Ok(Ev::Start(ns, e));
                }
                Event::Empty(e) => {
                    let ns = ns?;
                    if self.depth >= MAX_DEPTH {
                        return Err(SoapError::TooDeep);
                    }
                    self.check_attributes(&e)?;
                    return Ok(Ev::Empty(ns, e));
                }
                Event::End(_) => {
                    // quick-xml has already matched the name (check_end_names, no unmatched ends).
                    self.depth = self.depth.checked_sub(1).ok_or(SoapError::MalformedXml)?;
                    return Ok(Ev::End);
                }
                Event::Text(t) => return Ok(Ev::Text(t)),
                Event::CData(c) => return Ok(Ev::CData(c)),
                Event::Comment(_) | Event::PI(_) => {}
                Event::Decl(d) => {
                    if !first {
                        return Err(SoapError::MalformedXml);
                    }
                    // Without quick-xml's `encoding` feature every byte is read as UTF-8, so
                    // a document declaring anything else would be misread; refuse it.
                    if let Some(enc) = d.encoding() {
                        let enc = enc.map_err(|_| SoapError::MalformedXml)?;
                        if !enc.eq_ignore_ascii_case(b"utf-8") {
                            return Err(SoapError::UnsupportedEncoding);
                        }
                    }
                }
                Event::DocType(_) => return Err(SoapError::DoctypeForbidden),
                Event::Eof => return Ok(Ev::Eof),
            }
        }
    }

    /// quick-xml only validates attributes when they are iterated, so iterate them all.
    fn check_attributes(&self, e: &BytesStart) -> Result<(), SoapError> {
        for (i, attr) in e.attributes().enumerate() {
            if i >= MAX_ATTRIBUTES {
                return Err(SoapError::TooManyAttributes);
            }
            let attr = attr.map_err(|_| SoapError::MalformedXml)?;
            if let ResolveResult::Unknown(_) = self.reader.resolve_attribute(attr.key).0 {
                return Err(SoapError::UndeclaredPrefix);
            }
        }
        Ok(())
    }

    /// Reads `xsi:nil` / `xsi:type` on the element just returned; its own namespace
    /// declarations are still in scope until the next read.
    fn xsi_attrs(&self, e: &BytesStart) -> Result<XsiAttrs, SoapError> {
        let mut out = XsiAttrs::default();
        let (mut seen_nil, mut seen_type) = (false, false);
        for attr in e.attributes() {
            let attr = attr.map_err(|_| SoapError::MalformedXml)?;
            let (res, local) = self.reader.resolve_attribute(attr.key);
            if !matches!(res, ResolveResult::Bound(ns) if ns.0 == NS_XSI) {
                continue;
            }
            match local.as_ref() {
                b"nil" => {
                    // Two prefixes bound to xsi would repeat the attribute: not namespace-well-formed.
                    if std::mem::replace(&mut seen_nil, true) {
                        return Err(SoapError::MalformedXml);
                    }
                    let value = attr.unescape_value().map_err(xml_err)?;
                    out.nil = parse_xsd_bool(&value).ok_or(SoapError::InvalidNil)?;
                }
                b"type" => {
                    if std::mem::replace(&mut seen_type, true) {
                        return Err(SoapError::MalformedXml);
                    }
                    let value = attr.unescape_value().map_err(xml_err)?;
                    out.type_qname = Some(trim_xml_ws(&value).to_owned());
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// Next child of an element-only element; whitespace between children is ignored.
    fn next_child(&mut self) -> Result<Child<'i>, SoapError> {
        loop {
            match self.next()? {
                Ev::Start(ns, start) => {
                    return Ok(Child::Element {
                        ns,
                        start,
                        empty: false,
                    })
                }
                Ev::Empty(ns, start) => {
                    return Ok(Child::Element {
                        ns,
                        start,
                        empty: true,
                    })
                }
                Ev::End => return Ok(Child::End),
                Ev::Text(t) if is_xml_ws(&t) => {}
                Ev::CData(c) if is_xml_ws(&c) => {}
                Ev::Text(_) | Ev::CData(_) => return Err(SoapError::UnexpectedText),
                Ev::Eof => return Err(SoapError::MalformedXml),
            }
        }
    }

    /// Like [`Self::next_child`], but an element written `<x/>` has no children to read.
    fn next_child_of(&mut self, self_closing: bool) -> Result<Child<'i>, SoapError> {
        if self_closing {
            Ok(Child::End)
        } else {
            self.next_child()
        }
    }

    /// Consumes an element we do not interpret (SOAP Header), still checking well-formedness
    /// and depth. A loop, not recursion, so nesting costs no stack.
    fn skip(&mut self, empty: bool) -> Result<(), SoapError> {
        if empty {
            return Ok(());
        }
        let mut open = 1usize;
        while open > 0 {
            match self.next()? {
                Ev::Start(..) => open += 1,
                Ev::End => open -= 1,
                Ev::Text(t) => {
                    t.unescape().map_err(xml_err)?;
                }
                Ev::Empty(..) | Ev::CData(_) => {}
                Ev::Eof => return Err(SoapError::MalformedXml),
            }
        }
        Ok(())
    }

    /// Reads the character content of a simple element: text (entities and character
    /// references decoded) and CDATA, concatenated, untrimmed. Child elements yield `nested`.
    /// With `keep == false` nothing is accumulated and only "had non-blank content" is
    /// reported, so secrets like the SessionId are never copied.
    fn read_content(
        &mut self,
        empty: bool,
        keep: bool,
        nested: SoapError,
    ) -> Result<(String, bool), SoapError> {
        let mut value = String::new();
        let mut non_blank = false;
        if empty {
            return Ok((value, non_blank));
        }
        loop {
            match self.next()? {
                Ev::Text(t) => {
                    let piece = t.unescape().map_err(xml_err)?;
                    non_blank |= !is_xml_ws(piece.as_bytes());
                    if keep {
                        value.push_str(&piece);
                    }
                }
                Ev::CData(c) => {
                    let piece = c.decode().map_err(|_| SoapError::MalformedXml)?;
                    non_blank |= !is_xml_ws(piece.as_bytes());
                    if keep {
                        value.push_str(&piece);
                    }
                }
                Ev::End => return Ok((value, non_blank)),
                Ev::Start(..) | Ev::Empty(..) => return Err(nested),
                Ev::Eof => return Err(SoapError::MalformedXml),
            }
        }
    }

    /// A simple element's value: `None` when `xsi:nil` is true (content is still consumed
    /// and checked, then ignored), else the exact decoded text (`""` for `<x/>`).
    fn read_simple(
        &mut self,
        start: &BytesStart,
        empty: bool,
        nested: SoapError,
    ) -> Result<Option<String>, SoapError> {
        let nil = self.xsi_attrs(start)?.nil;
        let (value, _) = self.read_content(empty, !nil, nested)?;
        Ok((!nil).then_some(value))
    }

    fn document(mut self) -> Result<OutboundMessage, SoapError> {
        let (ns, start, empty) = loop {
            match self.next()? {
                Ev::Start(ns, e) => break (ns, e, false),
                Ev::Empty(ns, e) => break (ns, e, true),
                Ev::Text(t) if is_xml_ws(&t) => {}
                _ => return Err(SoapError::MalformedXml),
            }
        };
        if start.local_name().as_ref() != b"Envelope" {
            return Err(SoapError::NotSoapEnvelope);
        }
        match ns {
            Ns::Soap11 => {}
            Ns::Soap12 => return Err(SoapError::Soap12Unsupported),
            _ => return Err(SoapError::NotSoapEnvelope),
        }
        if empty {
            return Err(SoapError::MissingBody);
        }
        let message = self.envelope()?;
        // After the root: only whitespace, comments and PIs (filtered by `next`) may follow.
        loop {
            match self.next()? {
                Ev::Eof => return Ok(message),
                Ev::Text(t) if is_xml_ws(&t) => {}
                _ => return Err(SoapError::MalformedXml),
            }
        }
    }

    fn envelope(&mut self) -> Result<OutboundMessage, SoapError> {
        let mut seen_header = false;
        let mut message = None;
        loop {
            match self.next_child()? {
                Child::End => break,
                Child::Element {
                    ns: Ns::Soap11,
                    start,
                    empty,
                } => match start.local_name().as_ref() {
                    b"Header" => {
                        // SOAP 1.1: at most one Header, and it comes before Body.
                        if seen_header || message.is_some() {
                            return Err(SoapError::UnexpectedElement);
                        }
                        seen_header = true;
                        self.skip(empty)?;
                    }
                    b"Body" => {
                        if message.is_some() {
                            return Err(SoapError::DuplicateElement);
                        }
                        message = Some(self.body(empty)?);
                    }
                    _ => return Err(SoapError::UnexpectedElement),
                },
                Child::Element { .. } => return Err(SoapError::UnexpectedElement),
            }
        }
        message.ok_or(SoapError::MissingBody)
    }

    fn body(&mut self, empty: bool) -> Result<OutboundMessage, SoapError> {
        if empty {
            return Err(SoapError::MissingNotifications);
        }
        let mut message = None;
        loop {
            match self.next_child()? {
                Child::End => break,
                Child::Element { ns, start, empty } => {
                    if start.local_name().as_ref() != b"notifications" {
                        return Err(SoapError::UnexpectedElement);
                    }
                    if ns != Ns::Outbound {
                        return Err(SoapError::WrongNamespace);
                    }
                    if message.is_some() {
                        return Err(SoapError::DuplicateElement);
                    }
                    message = Some(self.notifications(empty)?);
                }
            }
        }
        message.ok_or(SoapError::MissingNotifications)
    }

    fn notifications(&mut self, self_closing: bool) -> Result<OutboundMessage, SoapError> {
        let mut org_id = None;
        let mut action_id = None;
        let mut session: Option<bool> = None;
        let (mut seen_enterprise_url, mut seen_partner_url) = (false, false);
        let mut notifications = Vec::new();
        let mut seen_ids = HashSet::new();
        let mut count = 0usize;
        loop {
            let (start, empty) = match self.next_child_of(self_closing)? {
                Child::End => break,
                Child::Element {
                    ns: Ns::Outbound,
                    start,
                    empty,
                } => (start, empty),
                Child::Element { .. } => return Err(SoapError::UnexpectedElement),
            };
            match start.local_name().as_ref() {
                b"OrganizationId" => {
                    if org_id.is_some() {
                        return Err(SoapError::DuplicateElement);
                    }
                    let value = self
                        .read_simple(&start, empty, SoapError::UnexpectedElement)?
                        .ok_or(SoapError::MissingOrganizationId)?;
                    let org = OrgId::parse(&value).map_err(|_| SoapError::InvalidOrganizationId)?;
                    org_id = Some(org);
                }
                b"ActionId" => {
                    if action_id.is_some() {
                        return Err(SoapError::DuplicateElement);
                    }
                    let value = self
                        .read_simple(&start, empty, SoapError::UnexpectedElement)?
                        .ok_or(SoapError::MissingActionId)?;
                    if value.is_empty()
                        || value.len() > 18
                        || !value.bytes().all(|b| b.is_ascii_alphanumeric())
                    {
                        return Err(SoapError::InvalidActionId);
                    }
                    action_id = Some(value);
                }
                b"SessionId" => {
                    if session.is_some() {
                        return Err(SoapError::DuplicateElement);
                    }
                    let nil = self.xsi_attrs(&start)?.nil;
                    let (_, non_blank) =
                        self.read_content(empty, false, SoapError::UnexpectedElement)?;
                    session = Some(!nil && non_blank);
                }
                b"EnterpriseUrl" | b"PartnerUrl" => {
                    let seen = if start.local_name().as_ref() == b"EnterpriseUrl" {
                        &mut seen_enterprise_url
                    } else {
                        &mut seen_partner_url
                    };
                    if std::mem::replace(seen, true) {
                        return Err(SoapError::DuplicateElement);
                    }
                    self.read_content(empty, false, SoapError::UnexpectedElement)?;
                }
                b"Notification" => {
                    // Count before parsing so a flood stops at the 101st start tag.
                    count += 1;
                    if count > MAX_NOTIFICATIONS {
                        return Err(SoapError::TooManyNotifications);
                    }
                    let notification = self.notification(empty)?;
                    if seen_ids.insert(notification.id.clone()) {
                        notifications.push(notification);
                    }
                }
                _ => return Err(SoapError::UnexpectedElement),
            }
        }
        let org_id = org_id.ok_or(SoapError::MissingOrganizationId)?;
        let action_id = action_id.ok_or(SoapError::MissingActionId)?;
        if notifications.is_empty() {
            return Err(SoapError::NoNotifications);
        }
        Ok(OutboundMessage {
            org_id,
            action_id,
            had_session_id: session.unwrap_or(false),
            notifications,
        })
    }

    fn notification(&mut self, self_closing: bool) -> Result<Notification, SoapError> {
        let mut id = None;
        let mut sobject = None;
        loop {
            let (start, empty) = match self.next_child_of(self_closing)? {
                Child::End => break,
                Child::Element {
                    ns: Ns::Outbound,
                    start,
                    empty,
                } => (start, empty),
                Child::Element { .. } => return Err(SoapError::UnexpectedElement),
            };
            match start.local_name().as_ref() {
                b"Id" => {
                    if id.is_some() {
                        return Err(SoapError::DuplicateElement);
                    }
                    let value = self
                        .read_simple(&start, empty, SoapError::UnexpectedElement)?
                        .ok_or(SoapError::MissingNotificationId)?;
                    let parsed = NotificationId::parse(&value)
                        .map_err(|_| SoapError::InvalidNotificationId)?;
                    id = Some(parsed);
                }
                b"sObject" => {
                    if sobject.is_some() {
                        return Err(SoapError::DuplicateElement);
                    }
                    sobject = Some(self.sobject(&start, empty)?);
                }
                _ => return Err(SoapError::UnexpectedElement),
            }
        }
        let id = id.ok_or(SoapError::MissingNotificationId)?;
        let (sobject_type, fields) = sobject.ok_or(SoapError::MissingSObject)?;
        let record_id = match fields.get("Id") {
            Some(Some(value)) if is_alnum_len(value, &[15, 18]) => Some(value.clone()),
            Some(Some(_)) => return Err(SoapError::InvalidRecordId),
            Some(None) | None => None,
        };
        Ok(Notification {
            id,
            sobject_type,
            record_id,
            fields,
        })
    }

    /// Resolves the `xsi:type` QName through the namespace bindings in scope at the sObject
    /// element (including ones declared on it) and returns its local part.
    fn sobject_type(&self, qname: &str) -> Result<String, SoapError> {
        let local = match qname.split_once(':') {
            Some((prefix, local)) if !prefix.is_empty() && !local.contains(':') => local,
            Some(_) => return Err(SoapError::InvalidSObjectType),
            None => qname,
        };
        // An unprefixed QName takes the default namespace, as for element names.
        match self.reader.resolve_element(QName(qname.as_bytes())).0 {
            ResolveResult::Unknown(_) => return Err(SoapError::UnresolvableTypePrefix),
            ResolveResult::Bound(ns) if ns.0 == NS_SOBJECT_ENTERPRISE => {}
            ResolveResult::Bound(ns) if ns.0 == NS_SOBJECT_PARTNER => {}
            _ => return Err(SoapError::UnsupportedSObjectNamespace),
        }
        if !is_api_name(local) {
            return Err(SoapError::InvalidSObjectType);
        }
        Ok(local.to_owned())
    }

    fn sobject(
        &mut self,
        start: &BytesStart,
        self_closing: bool,
    ) -> Result<(String, Fields), SoapError> {
        let qname = self
            .xsi_attrs(start)?
            .type_qname
            .ok_or(SoapError::MissingSObjectType)?;
        // Must run before the next read: the sObject's own xmlns declarations go out of
        // scope once its end (or, for `<sObject/>`, the next event) is read.
        let sobject_type = self.sobject_type(&qname)?;
        let mut fields = Fields::new();
        let mut to_null = BTreeSet::new();
        loop {
            let (start, empty) = match self.next_child_of(self_closing)? {
                Child::End => break,
                Child::Element {
                    ns: Ns::SObject,
                    start,
                    empty,
                } => (start, empty),
                Child::Element { .. } => return Err(SoapError::UnexpectedElement),
            };
            let name = std::str::from_utf8(start.local_name().as_ref())
                .map_err(|_| SoapError::MalformedXml)?
                .to_owned();
            if !is_api_name(&name) {
                return Err(SoapError::InvalidFieldName);
            }
            let value = self.read_simple(&start, empty, SoapError::NestedField)?;
            if name == "fieldsToNull" {
                // The schema makes fieldsToNull nillable; a nil or empty entry names nothing.
                match value {
                    Some(field) if !field.is_empty() => {
                        if !is_api_name(&field) {
                            return Err(SoapError::InvalidFieldsToNull);
                        }
                        to_null.insert(field);
                    }
                    _ => {}
                }
            } else if fields.insert(name, value).is_some() {
                return Err(SoapError::DuplicateField);
            }
        }
        // A field both sent with a value and listed in fieldsToNull is contradictory.
        for field in to_null {
            if fields.insert(field, None).is_some() {
                return Err(SoapError::DuplicateField);
            }
        }
        Ok((sobject_type, fields))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    const ORG: &str = "00D8d000001AbCdEAK";
    const ACTION: &str = "04k8d0000009GdPAAU";

    /// Real-shaped samples (the demo's too).
    fn fixture_dir() -> PathBuf {
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/salesforce/"))
    }

    /// Hostile inputs and the manifest of expected answers.
    fn hostile_dir() -> PathBuf {
        PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/salesforce/"
        ))
    }

    fn fixture(name: &str) -> Vec<u8> {
        let sample = fixture_dir().join(name);
        let path = if sample.exists() {
            sample
        } else {
            hostile_dir().join(name)
        };
        std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
    }

    fn parse_fixture(name: &str) -> OutboundMessage {
        parse_outbound_message(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e:?}"))
    }

    fn parse(s: &str) -> Result<OutboundMessage, SoapError> {
        parse_outbound_message(s.as_bytes())
    }

    fn nid(i: usize) -> String {
        format!("04l8d00001{i:05}AAA")
    }

    fn rid(i: usize) -> String {
        format!("0038d00000{i:05}AAA")
    }

    /// A standard envelope with the usual prefixes around `inner` (the notifications content).
    fn envelope(inner: &str) -> String {
        format!(
            r#"<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
 <soapenv:Body>
  <notifications xmlns="http://soap.sforce.com/2005/09/outbound">
   <OrganizationId>{ORG}</OrganizationId>
   <ActionId>{ACTION}</ActionId>
   <SessionId xsi:nil="true"/>
   <EnterpriseUrl>https://x.my.salesforce.com/services/Soap/c/60.0/00D8d000001AbCd</EnterpriseUrl>
   <PartnerUrl>https://x.my.salesforce.com/services/Soap/u/60.0/00D8d000001AbCd</PartnerUrl>
{inner}
  </notifications>
 </soapenv:Body>
</soapenv:Envelope>
"#
        )
    }

    /// A Contact notification with the given sObject content.
    fn notification(id: &str, fields: &str) -> String {
        format!(
            r#"   <Notification>
    <Id>{id}</Id>
    <sObject xsi:type="sf:Contact" xmlns:sf="urn:sobject.enterprise.soap.sforce.com">{fields}</sObject>
   </Notification>
"#
        )
    }

    fn one(fields: &str) -> String {
        envelope(&notification(&nid(1), fields))
    }

    fn field(msg: &OutboundMessage, name: &str) -> Option<String> {
        msg.notifications[0]
            .fields
            .get(name)
            .unwrap_or_else(|| panic!("field {name} absent"))
            .clone()
    }

    fn manifest() -> serde_json::Value {
        serde_json::from_slice(&fixture("manifest.json")).expect("manifest.json")
    }

    #[test]
    fn ack_true_is_byte_identical_to_fixture() {
        assert_eq!(
            ACK_TRUE.as_bytes(),
            fixture("response_ack_true.xml").as_slice()
        );
        assert_ne!(
            ACK_TRUE.as_bytes(),
            fixture("response_bad_ack_wrong_element.xml").as_slice()
        );
    }

    #[test]
    fn client_fault_matches_fixture_shape() {
        let fault = render_fault(
            false,
            "Request rejected: body is not a valid Salesforce outbound message",
        );
        assert_eq!(
            fault.as_bytes(),
            fixture("response_soap_fault_client.xml").as_slice()
        );
        assert!(render_fault(true, "x").contains("<faultcode>soapenv:Server</faultcode>"));
    }

    #[test]
    fn fault_escapes_markup() {
        let fault = render_fault(false, "a <b> & \"c\" 'd' \u{1}");
        assert!(fault.contains(
            "<faultstring>a &lt;b&gt; &amp; &quot;c&quot; &apos;d&apos; \u{FFFD}</faultstring>"
        ));
        assert!(!fault.contains("<b>"));
    }

    #[test]
    fn valid_fixtures_parse_with_expected_counts() {
        let expected = [
            ("om_contact_gdpr_removal_single.xml", 1, false),
            ("om_contact_gdpr_removal_redelivery.xml", 1, false),
            ("om_contact_batch_4.xml", 4, false),
            ("om_contact_batch_100.xml", 100, false),
            ("om_case_feedback.xml", 1, true),
            ("om_feedback_custom_object.xml", 1, false),
            ("om_feedback_nil_fields.xml", 1, false),
        ];
        for (name, count, had_session) in expected {
            let msg = parse_fixture(name);
            assert_eq!(msg.notifications.len(), count, "{name}");
            assert_eq!(msg.had_session_id, had_session, "{name}");
            assert_eq!(msg.org_id.as_str(), ORG, "{name}");
            for n in &msg.notifications {
                assert!(n.record_id.is_some(), "{name}");
                assert_eq!(n.fields.get("Id"), Some(&n.record_id), "{name}");
            }
        }
        // Every valid om_*.xml in the directory is covered above.
        for entry in std::fs::read_dir(fixture_dir()).unwrap() {
            let file = entry.unwrap().file_name().into_string().unwrap();
            if file.starts_with("om_") && file.ends_with(".xml") {
                assert!(
                    expected.iter().any(|(n, ..)| *n == file),
                    "{file} not covered"
                );
            }
        }
    }

    #[test]
    fn manifest_valid_xml_fixtures_parse() {
        for entry in manifest()["outbound_message_fixtures"].as_array().unwrap() {
            let file = entry["file"].as_str().unwrap();
            let kind = entry["kind"].as_str().unwrap();
            if file.ends_with(".xml") && kind.starts_with("valid") {
                parse_fixture(file);
            }
        }
    }

    #[test]
    fn manifest_400_fixtures_are_rejected() {
        let mut rejected = 0;
        for entry in manifest()["outbound_message_fixtures"].as_array().unwrap() {
            let file = entry["file"].as_str().unwrap();
            if !file.starts_with("hostile_") || !file.ends_with(".xml") {
                continue;
            }
            let result = parse_outbound_message(&fixture(file));
            match entry["expected_status"].as_u64().unwrap() {
                400 => {
                    let err = result.expect_err(file);
                    let text = err.to_string();
                    assert!(!text.contains("DROP") && !text.contains("passwd"), "{file}");
                    rejected += 1;
                }
                403 => {
                    // Org checking is the caller's job: the envelope itself is fine.
                    let msg = result.unwrap_or_else(|e| panic!("{file}: {e:?}"));
                    let ours = OrgId::parse(manifest()["configured_org_id"].as_str().unwrap());
                    assert!(!msg.org_id.same_org(&ours.unwrap()), "{file}");
                }
                other => panic!("{file}: unexpected status {other}"),
            }
        }
        assert!(rejected >= 10, "only {rejected} hostile fixtures checked");
    }

    #[test]
    fn hostile_fixtures_fail_for_the_right_reason() {
        let expected = [
            ("hostile_truncated.xml", SoapError::MalformedXml),
            ("hostile_wrong_namespace.xml", SoapError::WrongNamespace),
            ("hostile_no_namespace.xml", SoapError::WrongNamespace),
            ("hostile_not_soap_envelope.xml", SoapError::NotSoapEnvelope),
            (
                "hostile_xxe_external_entity.xml",
                SoapError::DoctypeForbidden,
            ),
            ("hostile_billion_laughs.xml", SoapError::DoctypeForbidden),
            ("hostile_empty_body.xml", SoapError::EmptyBody),
            (
                "hostile_missing_notification_id.xml",
                SoapError::MissingNotificationId,
            ),
            (
                "hostile_invalid_notification_id.xml",
                SoapError::InvalidNotificationId,
            ),
            (
                "hostile_missing_xsi_type.xml",
                SoapError::MissingSObjectType,
            ),
            (
                "hostile_101_notifications.xml",
                SoapError::TooManyNotifications,
            ),
        ];
        for (file, err) in expected {
            assert_eq!(parse_outbound_message(&fixture(file)), Err(err), "{file}");
        }
        assert!(parse_outbound_message(&fixture("hostile_wrong_content_type.json")).is_err());
    }

    #[test]
    fn field_values_and_nil_forms() {
        let msg = parse_fixture("om_feedback_nil_fields.xml");
        let n = &msg.notifications[0];
        assert_eq!(n.sobject_type, "Feedback__c");
        assert_eq!(n.record_id.as_deref(), Some("a0B8d00000AbCdFEAV"));
        assert_eq!(field(&msg, "Description__c"), None);
        assert_eq!(field(&msg, "Priority__c"), None);
        assert_eq!(field(&msg, "Rating__c"), None);
        assert_eq!(field(&msg, "Tester__c"), None);
        assert_eq!(field(&msg, "Platform__c").as_deref(), Some(""));
        assert_eq!(field(&msg, "Steps_To_Reproduce__c").as_deref(), Some(""));
        assert_eq!(
            field(&msg, "Subject__c").as_deref(),
            Some("Add dark mode to the tester portal")
        );
        assert_eq!(n.fields.len(), 12);

        let msg = parse_fixture("om_contact_gdpr_removal_single.xml");
        let n = &msg.notifications[0];
        assert_eq!(n.id.as_str(), "04l8d0000100001AAA");
        assert_eq!(n.sobject_type, "Contact");
        assert_eq!(msg.action_id, ACTION);
        assert_eq!(
            field(&msg, "Email").as_deref(),
            Some("marta.kowalska@example.org")
        );
        assert_eq!(
            field(&msg, "GDPR_Erasure_Requested__c").as_deref(),
            Some("true")
        );
        assert!(!n.is_record_deleted());
    }

    #[test]
    fn multiline_escaped_text_and_session_id_is_not_kept() {
        let msg = parse_fixture("om_case_feedback.xml");
        assert!(msg.had_session_id);
        let description = field(&msg, "Description").unwrap();
        assert!(description.starts_with("Steps:\n1. Open the beta build\n"));
        assert!(description.contains("with > 500 items"));
        assert!(!format!("{msg:?}").contains("FakeSessionToken"));
    }

    #[test]
    fn crlf_batch_and_non_ascii() {
        let msg = parse_fixture("om_contact_batch_4.xml");
        assert_eq!(msg.notifications.len(), 4);
        let names: Vec<_> = msg
            .notifications
            .iter()
            .map(|n| n.fields["LastName"].clone().unwrap())
            .collect();
        assert!(names.contains(&"Hernández".to_owned()), "{names:?}");
        // Line endings inside values are kept exactly as sent (quick-xml does not normalise).
        let msg = parse(&one(&format!(
            "<sf:Id>{}</sf:Id><sf:Description>a\r\nb\nc&#13;&#10;</sf:Description>",
            rid(1)
        )))
        .unwrap();
        assert_eq!(field(&msg, "Description").as_deref(), Some("a\r\nb\nc\r\n"));
    }

    #[test]
    fn batch_100_ids_are_distinct() {
        let msg = parse_fixture("om_contact_batch_100.xml");
        let ids: HashSet<_> = msg.notifications.iter().map(|n| n.id.clone()).collect();
        assert_eq!(ids.len(), 100);
    }

    #[test]
    fn custom_prefixes_are_resolved_by_uri() {
        let body = format!(
            r#"<S:Envelope xmlns:S="http://schemas.xmlsoap.org/soap/envelope/">
<S:Header><h:Trace xmlns:h="urn:example:trace" S:mustUnderstand="0"><h:Id>1</h:Id></h:Trace></S:Header>
<S:Body>
<o:notifications xmlns:o="http://soap.sforce.com/2005/09/outbound" xmlns:i="http://www.w3.org/2001/XMLSchema-instance">
<o:OrganizationId>{ORG}</o:OrganizationId>
<o:ActionId>{ACTION}</o:ActionId>
<o:SessionId i:nil="1"/>
<o:Notification>
<o:Id>{}</o:Id>
<o:sObject i:type="x:Contact" xmlns:x="urn:sobject.enterprise.soap.sforce.com"><x:Id>{}</x:Id><x:Email i:nil="true">ignored</x:Email><x:Phone/></o:sObject>
</o:Notification>
</o:notifications>
</S:Body>
</S:Envelope>"#,
            nid(1),
            rid(1)
        );
        let msg = parse(&body).unwrap();
        assert!(!msg.had_session_id);
        let n = &msg.notifications[0];
        assert_eq!(n.sobject_type, "Contact");
        assert_eq!(n.record_id, Some(rid(1)));
        assert_eq!(field(&msg, "Email"), None);
        assert_eq!(field(&msg, "Phone").as_deref(), Some(""));
    }

    #[test]
    fn prefixes_declared_on_ancestors_default_namespaces_and_redeclarations() {
        // `sf` declared once on the Envelope, used on the sObject and its fields.
        let body = format!(
            r#"<e:Envelope xmlns:e="http://schemas.xmlsoap.org/soap/envelope/" xmlns:sf="urn:sobject.enterprise.soap.sforce.com" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><e:Body><notifications xmlns="http://soap.sforce.com/2005/09/outbound"><OrganizationId>{ORG}</OrganizationId><ActionId>{ACTION}</ActionId><Notification><Id>{}</Id><sObject xsi:type="sf:Lead"><sf:Id>{}</sf:Id></sObject></Notification></notifications></e:Body></e:Envelope>"#,
            nid(1),
            rid(1)
        );
        assert_eq!(parse(&body).unwrap().notifications[0].sobject_type, "Lead");

        // Unprefixed type QName takes the default namespace in scope at the sObject.
        let body = format!(
            r#"<e:Envelope xmlns:e="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><e:Body><o:notifications xmlns:o="http://soap.sforce.com/2005/09/outbound"><o:OrganizationId>{ORG}</o:OrganizationId><o:ActionId>{ACTION}</o:ActionId><o:Notification><o:Id>{}</o:Id><o:sObject xmlns="urn:sobject.partner.soap.sforce.com" xsi:type="Case"><Id>{}</Id><Subject>s</Subject></o:sObject></o:Notification></o:notifications></e:Body></e:Envelope>"#,
            nid(1),
            rid(1)
        );
        let msg = parse(&body).unwrap();
        assert_eq!(msg.notifications[0].sobject_type, "Case");
        assert_eq!(field(&msg, "Subject").as_deref(), Some("s"));

        // `sf` bound to a wrong URI on the Envelope, rebound correctly on the sObject: fine.
        let ok = envelope(&notification(
            &nid(1),
            &format!("<sf:Id>{}</sf:Id>", rid(1)),
        ))
        .replace(
            "<soapenv:Envelope ",
            "<soapenv:Envelope xmlns:sf=\"urn:wrong\" ",
        );
        assert!(parse(&ok).is_ok());

        // The literal `sf:` prefix bound to another namespace must not pass.
        let bad = one("").replace(
            "xmlns:sf=\"urn:sobject.enterprise.soap.sforce.com\"",
            "xmlns:sf=\"http://soap.sforce.com/2006/04/metadata\"",
        );
        assert_eq!(parse(&bad), Err(SoapError::UnsupportedSObjectNamespace));
    }

    #[test]
    fn xsi_bound_to_another_prefix() {
        let body = one(&format!(
            "<sf:Id>{}</sf:Id><sf:Title q:nil=\"true\"/>",
            rid(1)
        ))
        .replace(
            "xsi:type=\"sf:Contact\"",
            "q:type=\"sf:Contact\" xmlns:q=\"http://www.w3.org/2001/XMLSchema-instance\"",
        );
        let msg = parse(&body).unwrap();
        assert_eq!(msg.notifications[0].sobject_type, "Contact");
        assert_eq!(field(&msg, "Title"), None);
        // An `xsi:type` whose prefix is bound elsewhere is not the XSI type attribute.
        let body = one("").replace(
            "xsi:type=\"sf:Contact\"",
            "xsi:type=\"sf:Contact\" xmlns:xsi=\"urn:not-xsi\"",
        );
        assert_eq!(parse(&body), Err(SoapError::MissingSObjectType));
    }

    #[test]
    fn type_qname_errors() {
        let with_type = |t: &str| one("").replace("sf:Contact", t);
        assert_eq!(
            parse(&with_type("zz:Contact")),
            Err(SoapError::UnresolvableTypePrefix)
        );
        assert_eq!(
            parse(&with_type("Contact")),
            Err(SoapError::UnsupportedSObjectNamespace)
        );
        assert_eq!(
            parse(&with_type("xsd:string")),
            Err(SoapError::UnsupportedSObjectNamespace)
        );
        for bad in ["sf:Con-tact", "sf:", "sf:a:b", ":Contact", "sf:1Contact"] {
            assert_eq!(
                parse(&with_type(bad)),
                Err(SoapError::InvalidSObjectType),
                "{bad}"
            );
        }
        assert!(parse(&with_type(" sf:Feedback__c ")).is_ok());
    }

    #[test]
    fn soap12_is_rejected() {
        let body = one("").replace(
            "http://schemas.xmlsoap.org/soap/envelope/",
            "http://www.w3.org/2003/05/soap-envelope",
        );
        assert_eq!(parse(&body), Err(SoapError::Soap12Unsupported));
        assert_eq!(
            SoapError::Soap12Unsupported.to_string(),
            "SOAP 1.2 is not supported; Outbound Messages use SOAP 1.1"
        );
    }

    #[test]
    fn cdata_entities_and_character_references_are_decoded() {
        let msg = parse(&one(
            "<sf:Name>&#x41;&#66;&amp;&lt;&gt;&quot;&apos;<![CDATA[<b>&amp;</b>]]> tail </sf:Name>\
             <sf:Only><![CDATA[]]></sf:Only><sf:Split>a<!-- c -->b</sf:Split>",
        ))
        .unwrap();
        assert_eq!(
            field(&msg, "Name").as_deref(),
            Some("AB&<>\"'<b>&amp;</b> tail ")
        );
        assert_eq!(field(&msg, "Only").as_deref(), Some(""));
        assert_eq!(field(&msg, "Split").as_deref(), Some("ab"));
        assert_eq!(msg.notifications[0].record_id, None);
    }

    #[test]
    fn undeclared_entities_and_bad_references_are_rejected() {
        assert_eq!(
            parse(&one("<sf:Name>&foo;</sf:Name>")),
            Err(SoapError::UndeclaredEntity)
        );
        assert_eq!(
            parse(&one("<sf:Name>&#0;</sf:Name>")),
            Err(SoapError::MalformedXml)
        );
        assert_eq!(
            parse(&one("<sf:Name>a & b</sf:Name>")),
            Err(SoapError::MalformedXml)
        );
        // Also inside the SessionId and skipped headers, whose values are otherwise ignored.
        let body = one("").replace(
            "<SessionId xsi:nil=\"true\"/>",
            "<SessionId>&ent;</SessionId>",
        );
        assert_eq!(parse(&body), Err(SoapError::UndeclaredEntity));
        let body = one("").replace(
            " <soapenv:Body>",
            " <soapenv:Header><x xmlns=\"urn:x\">&ent;</x></soapenv:Header><soapenv:Body>",
        );
        assert_eq!(parse(&body), Err(SoapError::UndeclaredEntity));
    }

    #[test]
    fn large_field_is_kept_exactly() {
        let big: String = "0123456789".repeat(10_000);
        let msg = parse(&one(&format!("<sf:Description>{big}</sf:Description>"))).unwrap();
        assert_eq!(field(&msg, "Description").unwrap(), big);
        assert_eq!(field(&msg, "Description").unwrap().len(), 100_000);
    }

    #[test]
    fn deep_nesting_fails_fast() {
        let deep = |n: usize| format!("{}{}", "<a>".repeat(n), "</a>".repeat(n));
        // Inside a Header, where content is skipped rather than interpreted.
        let header = |inner: String| {
            one("").replace(
                " <soapenv:Body>",
                &format!(
                    " <soapenv:Header><h xmlns=\"urn:h\">{inner}</h></soapenv:Header><soapenv:Body>"
                ),
            )
        };
        assert_eq!(parse(&header(deep(10_000))), Err(SoapError::TooDeep));
        // Envelope + Header + h = 3 levels, so MAX_DEPTH - 3 more fit exactly.
        assert!(parse(&header(deep(MAX_DEPTH - 3))).is_ok());
        assert_eq!(parse(&header(deep(MAX_DEPTH - 2))), Err(SoapError::TooDeep));
        let empty_at_limit = format!(
            "{}<b/>{}",
            "<a>".repeat(MAX_DEPTH - 3),
            "</a>".repeat(MAX_DEPTH - 3)
        );
        assert_eq!(parse(&header(empty_at_limit)), Err(SoapError::TooDeep));
        // As the document root, and inside a field.
        assert_eq!(parse(&deep(10_000)), Err(SoapError::NotSoapEnvelope));
        let in_field = format!("<sf:Name>{}</sf:Name>", deep(10_000));
        assert_eq!(parse(&one(&in_field)), Err(SoapError::NestedField));
        // Unclosed deep nesting (as in a truncated flood) stops at the cap too.
        let open_only = one("").replace(
            " <soapenv:Body>",
            &format!("<soapenv:Header>{}", "<x:a xmlns:x=\"u\">".repeat(10_000)),
        );
        assert_eq!(parse(&open_only), Err(SoapError::TooDeep));
    }

    #[test]
    fn deleted_record_notification_parses() {
        let msg = parse(&one(&format!("<sf:Id>{}</sf:Id>", rid(7)))).unwrap();
        let n = &msg.notifications[0];
        assert!(n.is_record_deleted());
        assert_eq!(n.record_id, Some(rid(7)));
        assert_eq!(n.fields.len(), 1);
        // An sObject with no content at all is accepted too.
        let msg = parse(&envelope(&format!(
            "<Notification><Id>{}</Id><sObject xsi:type=\"sf:Contact\" xmlns:sf=\"urn:sobject.enterprise.soap.sforce.com\"/></Notification>",
            nid(1)
        )))
        .unwrap();
        assert!(msg.notifications[0].fields.is_empty());
        assert_eq!(msg.notifications[0].sobject_type, "Contact");
    }

    #[test]
    fn duplicate_notification_ids_keep_the_first() {
        let inner = [
            notification(&nid(1), "<sf:Email>first</sf:Email>"),
            notification(&nid(2), "<sf:Email>other</sf:Email>"),
            notification(&nid(1), "<sf:Email>second</sf:Email>"),
        ]
        .concat();
        let msg = parse(&envelope(&inner)).unwrap();
        assert_eq!(msg.notifications.len(), 2);
        assert_eq!(msg.notifications[0].id.as_str(), nid(1));
        assert_eq!(field(&msg, "Email").as_deref(), Some("first"));
        assert_eq!(msg.notifications[1].id.as_str(), nid(2));
    }

    #[test]
    fn notification_count_limits() {
        let many = |n: usize, same_id: bool| {
            let inner: String = (0..n)
                .map(|i| notification(&nid(if same_id { 0 } else { i }), ""))
                .collect();
            parse(&envelope(&inner))
        };
        assert_eq!(many(100, false).unwrap().notifications.len(), 100);
        assert_eq!(many(101, false), Err(SoapError::TooManyNotifications));
        // Duplicates count towards the limit even though they are collapsed.
        assert_eq!(many(101, true), Err(SoapError::TooManyNotifications));
        assert_eq!(many(100, true).unwrap().notifications.len(), 1);
        assert_eq!(many(0, false), Err(SoapError::NoNotifications));
        // The 101st start tag is enough: the rest is never read.
        let cut = envelope(
            &(0..101)
                .map(|i| notification(&nid(i), ""))
                .collect::<String>(),
        );
        let cut = &cut[..cut.rfind("<Notification>").unwrap() + "<Notification>".len()];
        assert_eq!(parse(cut), Err(SoapError::TooManyNotifications));
    }

    #[test]
    fn every_truncation_of_a_valid_message_fails() {
        for name in [
            "om_contact_gdpr_removal_single.xml",
            "om_contact_batch_4.xml",
        ] {
            let body = fixture(name);
            // Trailing whitespace after the root is optional; anything shorter is truncated.
            let end = body.trim_ascii_end().len();
            for cut in 0..end {
                if std::str::from_utf8(&body[..cut]).is_err() {
                    continue; // a cut inside a multi-byte character is an UTF-8 error, tested elsewhere
                }
                assert!(
                    parse_outbound_message(&body[..cut]).is_err(),
                    "{name} cut at {cut}"
                );
            }
            assert!(parse_outbound_message(&body[..end]).is_ok());
        }
    }

    #[test]
    fn malformed_documents_are_rejected() {
        let good = one("");
        assert!(parse(&good).is_ok());
        let cases = [
            // mismatched end tag
            good.replace("</Notification>", "</Notificatio>"),
            // unclosed root
            good.replace("</soapenv:Envelope>", ""),
            // truncated inside a tag
            good[..good.find("<ActionId").unwrap() + 5].to_owned(),
            // trailing garbage and a second root
            format!("{good}garbage"),
            format!("{good}<soapenv:Envelope xmlns:soapenv=\"http://schemas.xmlsoap.org/soap/envelope/\"/>"),
            // stray end tag
            format!("{good}</x>"),
            // text before the root, declaration not first
            format!("junk{good}"),
            format!("<!-- c -->{good}"),
            // duplicate attribute
            good.replace("<sObject ", "<sObject a=\"1\" a=\"2\" "),
            // attribute without value
            good.replace("<sObject ", "<sObject a "),
        ];
        for body in &cases {
            assert_eq!(parse(body), Err(SoapError::MalformedXml), "{body}");
        }
        assert_eq!(parse("   "), Err(SoapError::MalformedXml));
        assert_eq!(parse(""), Err(SoapError::EmptyBody));
        assert_eq!(
            parse_outbound_message(b"<a>\xff</a>"),
            Err(SoapError::InvalidUtf8)
        );
        assert_eq!(
            parse(&good.replace("encoding=\"UTF-8\"", "encoding=\"ISO-8859-1\"")),
            Err(SoapError::UnsupportedEncoding)
        );
        assert_eq!(
            parse(&good.replace("<soapenv:Body>", "<soapenv:Body><!DOCTYPE x>")),
            Err(SoapError::DoctypeForbidden)
        );
        assert_eq!(
            parse(&good.replace("<Notification>", "<p:Notification>")),
            Err(SoapError::UndeclaredPrefix)
        );
        assert_eq!(
            parse(&good.replace("<sObject ", "<sObject p:a=\"1\" ")),
            Err(SoapError::UndeclaredPrefix)
        );
        // Comments, PIs and a BOM are harmless.
        let decorated = format!("\u{feff}{good}<!-- end --><?pi x?>\n")
            .replace("<Notification>", "<?pi y?><!-- n --><Notification>");
        assert!(parse(&decorated).is_ok());
    }

    #[test]
    fn structural_errors() {
        let good = one("");
        let check = |body: String, err: SoapError| assert_eq!(parse(&body), Err(err), "{body}");
        check(
            good.replace("<Notification>", "text<Notification>"),
            SoapError::UnexpectedText,
        );
        check(
            good.replace("<Notification>", "<![CDATA[x]]><Notification>"),
            SoapError::UnexpectedText,
        );
        check(
            good.replace("<Notification>", "<Extra/><Notification>"),
            SoapError::UnexpectedElement,
        );
        check(
            good.replace("<Notification>", "<x:Id xmlns:x=\"urn:x\"/><Notification>"),
            SoapError::UnexpectedElement,
        );
        check(
            good.replace("<ActionId>", "<ActionId>x</ActionId><ActionId>"),
            SoapError::DuplicateElement,
        );
        check(
            good.replace(&format!("<ActionId>{ACTION}</ActionId>"), ""),
            SoapError::MissingActionId,
        );
        check(good.replace(ACTION, "04k-bad"), SoapError::InvalidActionId);
        check(
            good.replace(ACTION, "04k8d0000009GdPAAUX"),
            SoapError::InvalidActionId,
        );
        check(
            good.replace(&format!("<OrganizationId>{ORG}</OrganizationId>"), ""),
            SoapError::MissingOrganizationId,
        );
        check(
            good.replace(ORG, " 00D8d000001AbCdEAK"),
            SoapError::InvalidOrganizationId,
        );
        check(
            good.replace(&format!("<Id>{}</Id>", nid(1)), "<Id xsi:nil=\"true\"/>"),
            SoapError::MissingNotificationId,
        );
        check(
            good.replace(&format!("<Id>{}</Id>", nid(1)), "<Id><b/></Id>"),
            SoapError::UnexpectedElement,
        );
        check(
            envelope(&format!("<Notification><Id>{}</Id></Notification>", nid(1))),
            SoapError::MissingSObject,
        );
        check(
            good.replace("</Notification>", "<Id>x</Id></Notification>"),
            SoapError::DuplicateElement,
        );
        check(
            good.replace(" <soapenv:Body>", " <soapenv:Body/><soapenv:Body>"),
            SoapError::MissingNotifications,
        );
        check(
            good.replace("</soapenv:Body>", "</soapenv:Body><soapenv:Body/>"),
            SoapError::DuplicateElement,
        );
        check(
            good.replace("</soapenv:Body>", "</soapenv:Body><soapenv:Header/>"),
            SoapError::UnexpectedElement,
        );
        check(
            good.replace(
                "</notifications>",
                "</notifications><n:notifications xmlns:n=\"http://soap.sforce.com/2005/09/outbound\"/>",
            ),
            SoapError::DuplicateElement,
        );
        check(
            good.replace("</notifications>", "</notifications><Other/>"),
            SoapError::UnexpectedElement,
        );
        let no_body = format!(
            "<soapenv:Envelope xmlns:soapenv=\"{}\"><soapenv:Header/></soapenv:Envelope>",
            std::str::from_utf8(NS_SOAP11).unwrap()
        );
        check(no_body, SoapError::MissingBody);
        check(
            good.replace("soapenv:Envelope", "soapenv:Envelop"),
            SoapError::NotSoapEnvelope,
        );
    }

    #[test]
    fn field_errors() {
        let check =
            |fields: &str, err: SoapError| assert_eq!(parse(&one(fields)), Err(err), "{fields}");
        check(
            "<sf:Email>a</sf:Email><sf:Email>b</sf:Email>",
            SoapError::DuplicateField,
        );
        check(
            "<sf:Email><sf:X>a</sf:X></sf:Email>",
            SoapError::NestedField,
        );
        check("<sf:Email>a<x/>b</sf:Email>", SoapError::NestedField);
        check(
            "<Email xmlns=\"urn:x\">a</Email>",
            SoapError::UnexpectedElement,
        );
        check("<sf:_Bad>a</sf:_Bad>", SoapError::InvalidFieldName);
        check("<sf:Bad.Name>a</sf:Bad.Name>", SoapError::InvalidFieldName);
        check("<sf:Email xsi:nil=\"yes\"/>", SoapError::InvalidNil);
        check("<sf:Id>not-an-id</sf:Id>", SoapError::InvalidRecordId);
        check("<sf:Id/>", SoapError::InvalidRecordId);
        check(
            "<sf:fieldsToNull>Bad Name</sf:fieldsToNull>",
            SoapError::InvalidFieldsToNull,
        );
        check(
            "<sf:fieldsToNull>Email</sf:fieldsToNull><sf:Email>x</sf:Email>",
            SoapError::DuplicateField,
        );
        check(
            "<sf:Email xsi:nil=\"true\" i:nil=\"true\" xmlns:i=\"http://www.w3.org/2001/XMLSchema-instance\"/>",
            SoapError::MalformedXml,
        );
    }

    #[test]
    fn fields_to_null_and_nil_variants() {
        let msg = parse(&one(
            "<sf:fieldsToNull>Phone</sf:fieldsToNull><sf:fieldsToNull>Title</sf:fieldsToNull>\
             <sf:fieldsToNull>Phone</sf:fieldsToNull><sf:fieldsToNull xsi:nil=\"true\"/>\
             <sf:fieldsToNull/><sf:Email xsi:nil=\"false\">e</sf:Email><sf:A xsi:nil=\" 0 \"/>\
             <sf:B xsi:nil=\"true\">\n  </sf:B><sf:Id xsi:nil=\"true\"/>",
        ))
        .unwrap();
        let n = &msg.notifications[0];
        assert_eq!(field(&msg, "Phone"), None);
        assert_eq!(field(&msg, "Title"), None);
        assert_eq!(field(&msg, "Email").as_deref(), Some("e"));
        assert_eq!(field(&msg, "A").as_deref(), Some(""));
        assert_eq!(field(&msg, "B"), None);
        assert_eq!(n.record_id, None);
        assert!(!n.fields.contains_key("fieldsToNull"));
        assert_eq!(n.fields.len(), 6);
    }

    #[test]
    fn session_id_presence_only() {
        let with_session = |s: &str| {
            parse(&one("").replace("<SessionId xsi:nil=\"true\"/>", s))
                .unwrap()
                .had_session_id
        };
        assert!(with_session("<SessionId>00D!secret</SessionId>"));
        assert!(with_session("<SessionId><![CDATA[secret]]></SessionId>"));
        assert!(!with_session(
            "<SessionId xsi:nil=\"true\">secret</SessionId>"
        ));
        assert!(!with_session("<SessionId/>"));
        assert!(!with_session("<SessionId>  </SessionId>"));
        assert!(!with_session(""));
        let msg = parse(&one("").replace(
            "<SessionId xsi:nil=\"true\"/>",
            "<SessionId>00D!supersecret</SessionId>",
        ))
        .unwrap();
        assert!(!format!("{msg:?}").contains("supersecret"));
    }

    #[test]
    fn many_attributes_or_namespace_declarations_fail_fast() {
        // The fuzzer's regressions (fuzz/regressions/soap_parser/), made larger: quadratic
        // work before the cap, a quick refusal after it.
        let attrs: String = (0..100_000).map(|i| format!(" a{i}=\"\"")).collect();
        let decls: String = (0..100_000).map(|i| format!(" xmlns:p{i}=\"u\"")).collect();
        for body in [format!("<h{attrs}/>"), format!("<h{decls}/>")] {
            let started = std::time::Instant::now();
            assert_eq!(parse(&body), Err(SoapError::TooManyAttributes));
            assert!(
                started.elapsed() < std::time::Duration::from_secs(1),
                "{:?}",
                started.elapsed()
            );
        }
    }

    #[test]
    fn error_codes_are_unique_snake_case() {
        let all = [
            SoapError::EmptyBody,
            SoapError::InvalidUtf8,
            SoapError::UnsupportedEncoding,
            SoapError::MalformedXml,
            SoapError::DoctypeForbidden,
            SoapError::UndeclaredEntity,
            SoapError::UndeclaredPrefix,
            SoapError::TooDeep,
            SoapError::TooManyAttributes,
            SoapError::NotSoapEnvelope,
            SoapError::Soap12Unsupported,
            SoapError::MissingBody,
            SoapError::MissingNotifications,
            SoapError::WrongNamespace,
            SoapError::UnexpectedElement,
            SoapError::DuplicateElement,
            SoapError::UnexpectedText,
            SoapError::MissingOrganizationId,
            SoapError::InvalidOrganizationId,
            SoapError::MissingActionId,
            SoapError::InvalidActionId,
            SoapError::NoNotifications,
            SoapError::TooManyNotifications,
            SoapError::MissingNotificationId,
            SoapError::InvalidNotificationId,
            SoapError::MissingSObject,
            SoapError::MissingSObjectType,
            SoapError::UnresolvableTypePrefix,
            SoapError::UnsupportedSObjectNamespace,
            SoapError::InvalidSObjectType,
            SoapError::InvalidFieldName,
            SoapError::NestedField,
            SoapError::DuplicateField,
            SoapError::InvalidFieldsToNull,
            SoapError::InvalidNil,
            SoapError::InvalidRecordId,
        ];
        let codes: HashSet<_> = all.iter().map(SoapError::code).collect();
        assert_eq!(codes.len(), all.len());
        for e in &all {
            let code = e.code();
            assert!(code
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'));
            assert!(!e.to_string().is_empty());
        }
    }
}
